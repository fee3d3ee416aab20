//! Fresh databases for tests (this crate's conformance suite and the integration tests):
//! a new PostgreSQL database per test on `COUNTERSIGN_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), or a new SQLite file in a temporary folder.
//! Test support only: it panics on failure, as tests should.
#![allow(clippy::expect_used, clippy::panic, clippy::disallowed_methods)]

use std::sync::Arc;

use uuid::Uuid;

use crate::{PostgresStore, SharedStore, SqliteStore};

/// A store on a fresh database, and a way to open a second instance on the same database.
#[derive(Debug)]
pub struct TestDb {
    pub store: SharedStore,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Postgres {
        admin: String,
        name: String,
        url: String,
    },
    Sqlite {
        _dir: tempfile::TempDir,
        url: String,
    },
}

pub fn admin_url() -> String {
    std::env::var("COUNTERSIGN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

impl TestDb {
    pub async fn postgres() -> Self {
        use sqlx::Connection;
        let admin = admin_url();
        let name = format!("cs_test_{}", Uuid::now_v7().simple());
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("admin connection");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create database");
        let url = match admin.rfind('/') {
            Some(i) => format!("{}/{name}", &admin[..i]),
            None => panic!("admin URL has no database part"),
        };
        let store = Arc::new(PostgresStore::connect(&url, 16).await.expect("connect"));
        Self {
            store,
            kind: Kind::Postgres { admin, name, url },
        }
    }

    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("events.db").display());
        let store = Arc::new(SqliteStore::connect(&url).await.expect("open"));
        Self {
            store,
            kind: Kind::Sqlite { _dir: dir, url },
        }
    }

    /// Another instance on the same database, as a second process would have.
    pub async fn second_instance(&self) -> SharedStore {
        match &self.kind {
            Kind::Postgres { url, .. } => {
                Arc::new(PostgresStore::connect(url, 16).await.expect("connect"))
            }
            Kind::Sqlite { url, .. } => Arc::new(SqliteStore::connect(url).await.expect("open")),
        }
    }

    pub fn url(&self) -> &str {
        match &self.kind {
            Kind::Postgres { url, .. } | Kind::Sqlite { url, .. } => url,
        }
    }

    pub async fn finish(self) {
        drop(self.store);
        if let Kind::Postgres { admin, name, .. } = self.kind {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await;
            }
        }
    }
}

/// Turns each named `async fn(&TestDb)` into two tests, `postgres::<name>` and
/// `sqlite::<name>`, each on a fresh database that is dropped afterwards.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let db = $crate::testing::TestDb::postgres().await;
                    super::$test(&db).await;
                    db.finish().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let db = $crate::testing::TestDb::sqlite().await;
                    super::$test(&db).await;
                    db.finish().await;
                }
            )*
        }
    };
}
