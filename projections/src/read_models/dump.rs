//! A deterministic text rendering of every read-model table except the checkpoints: one line
//! per row (`table col=value …`, bytes in hex, text quoted, `null`), lines sorted, so a
//! rebuild can be compared with the incremental result byte for byte.

use countersign_eventstore::with_pool;

use super::rows::Get;
use super::{ProjectionError, ReadModels};

#[derive(Clone, Copy)]
enum Kind {
    Bytes,
    Text,
    Int,
    Bool,
}

use Kind::{Bool, Bytes, Int, Text};

const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "rm_servers",
        &[
            ("server_id", Bytes),
            ("name", Text),
            ("logo_url", Text),
            ("settings", Text),
            ("public_key", Bytes),
            ("key_thumbprint", Bytes),
            ("created_at", Int),
            ("deleted_at", Int),
            ("last_position", Int),
        ],
    ),
    (
        "rm_api_keys",
        &[
            ("secret_hash", Bytes),
            ("server_id", Bytes),
            ("key_id", Bytes),
            ("label", Text),
            ("issued_at", Int),
            ("revoked_at", Int),
        ],
    ),
    (
        "rm_oidc_clients",
        &[
            ("server_id", Bytes),
            ("client_id", Bytes),
            ("settings", Text),
            ("secret_hash", Bytes),
            ("created_at", Int),
            ("updated_at", Int),
            ("removed", Bool),
            ("last_position", Int),
        ],
    ),
    (
        "rm_oidc_keys",
        &[
            ("server_id", Bytes),
            ("kid", Text),
            ("public_key", Bytes),
            ("rotated_at", Int),
            ("position", Int),
        ],
    ),
    (
        "rm_users",
        &[
            ("server_id", Bytes),
            ("user_digest", Bytes),
            ("userid_sealed", Bytes),
            ("registered_at", Int),
            ("registered_position", Int),
            ("last_position", Int),
        ],
    ),
    (
        "rm_user_attributes",
        &[
            ("server_id", Bytes),
            ("user_digest", Bytes),
            ("name", Text),
            ("value_sealed", Bytes),
        ],
    ),
    (
        "rm_accounts",
        &[
            ("server_id", Bytes),
            ("account_id", Bytes),
            ("user_digest", Bytes),
            ("app_instance", Bytes),
            ("second_factor", Text),
            ("signing_key_thumbprint", Bytes),
            ("registered_at", Int),
            ("last_position", Int),
        ],
    ),
    (
        "rm_enrolments",
        &[
            ("server_id", Bytes),
            ("enrolment_id", Bytes),
            ("user_digest", Bytes),
            ("state", Text),
            ("expires_at", Int),
            ("account_id", Bytes),
            ("last_position", Int),
        ],
    ),
    (
        "rm_sessions",
        &[
            ("server_id", Bytes),
            ("hsid", Bytes),
            ("state", Text),
            ("ping_time_secs", Int),
            ("expires_at", Int),
            ("ping_deadline", Int),
            ("app_login", Bool),
            ("intended_user", Bytes),
            ("user_digest", Bytes),
            ("account_id", Bytes),
            ("announce_info", Text),
            ("session_info", Text),
            ("opened_at", Int),
            ("updated_at", Int),
            ("last_position", Int),
            ("history", Text),
        ],
    ),
    (
        "rm_transactions",
        &[
            ("server_id", Bytes),
            ("transaction_id", Bytes),
            ("user_digest", Bytes),
            ("account_id", Bytes),
            ("origin", Text),
            ("status", Text),
            ("content_type", Text),
            ("data", Bytes),
            ("text", Text),
            ("announce_info", Text),
            ("created_at", Int),
            ("expires_at", Int),
            ("presented_by", Bytes),
            ("signed_by", Bytes),
            ("factor", Text),
            ("signed_at", Int),
            ("rejected_by", Bytes),
            ("rejected_at", Int),
            ("expired_at", Int),
            ("last_position", Int),
        ],
    ),
];

fn render(
    row: &impl Get,
    table: &str,
    columns: &[(&str, Kind)],
) -> Result<String, ProjectionError> {
    let mut line = table.to_owned();
    for (i, (name, kind)) in columns.iter().enumerate() {
        let value = match kind {
            Bytes => row.opt_bytes(i)?.map(hex::encode),
            Text => row.opt_text(i)?.map(|t| format!("{t:?}")),
            Int => row.opt_int(i)?.map(|n| n.to_string()),
            Bool => Some(row.boolean(i)?.to_string()),
        };
        line.push(' ');
        line.push_str(name);
        line.push('=');
        line.push_str(value.as_deref().unwrap_or("null"));
    }
    Ok(line)
}

impl ReadModels {
    /// Every read-model row but the checkpoints, as sorted lines of text (see the module docs).
    pub async fn dump(&self) -> Result<String, ProjectionError> {
        let mut lines = Vec::new();
        for (table, columns) in TABLES {
            let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
            let sql = format!("SELECT {} FROM {table}", names.join(", "));
            with_pool!(&self.inner.db, pool => {
                for row in sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await? {
                    lines.push(render(&row, table, columns)?);
                }
            });
        }
        lines.sort_unstable();
        let mut text = lines.join("\n");
        text.push('\n');
        Ok(text)
    }
}
