use std::collections::BTreeMap;

use super::*;
use crate::aggregate::ErrorKind;
use crate::event::DomainEvent;
use crate::ids::{ServerId, Timestamp, UserDigestKey};
use crate::seal::{CounterSealer, Sealer, aad};
use crate::testing::{NOW, given, given_nothing, test_key, test_sealer};

const SERVER: ServerId = ServerId::from_bytes([0x11; 16]);

fn userid() -> Userid {
    Userid::new("alice@example.com").unwrap()
}

fn digest_key() -> UserDigestKey {
    UserDigestKey::hmac_sha256([0x5a; 32])
}

fn user() -> UserRef {
    UserRef::new(SERVER, &digest_key(), &userid())
}

fn register() -> RegisterUser {
    RegisterUser {
        user: user(),
        userid: userid(),
    }
}

/// The events a fresh test sealer produces, in order, so expectations match byte for byte.
fn registered() -> UserEvent {
    let userid = test_sealer()
        .seal(&aad(&user().stream(), "userid"), b"alice@example.com")
        .unwrap();
    UserEvent::Registered(UserRegistered {
        user: user(),
        userid,
    })
}

fn set(name: &str) -> UserEvent {
    let value = test_sealer()
        .seal(&aad(&user().stream(), &attribute_field(name)), b"v")
        .unwrap();
    UserEvent::AttributeSet(UserAttributeSet {
        name: name.into(),
        value,
    })
}

fn set_cmd(name: &str) -> SetAttribute {
    SetAttribute {
        name: name.into(),
        value: "v".into(),
    }
}

fn deleted() -> UserEvent {
    UserEvent::Deleted(UserDeleted { deleted_at: NOW })
}

fn invalid(e: ValidationError) -> UserError {
    UserError::Invalid(e)
}

#[test]
fn register_seals_the_userid_bound_to_the_stream() {
    let events = given_nothing::<User>().when(register()).events();
    assert_eq!(events, vec![registered()]);
    let UserEvent::Registered(e) = &events[0] else {
        panic!()
    };
    assert_eq!(e.user.stream(), user().stream());
    let payload = events[0].encode().unwrap();
    assert!(
        !payload.windows(5).any(|w| w == b"alice"),
        "userid in clear"
    );
    let stream = user().stream();
    assert_eq!(
        test_key().open(&aad(&stream, "userid"), &e.userid).unwrap(),
        b"alice@example.com"
    );
    // Moved to another user's stream or field, it no longer opens.
    let other = UserRef::new(SERVER, &digest_key(), &Userid::new("bob").unwrap()).stream();
    assert!(test_key().open(&aad(&other, "userid"), &e.userid).is_err());
    assert!(
        test_key()
            .open(&aad(&stream, "attribute/userid"), &e.userid)
            .is_err()
    );
}

#[test]
fn register_twice_conflicts() {
    given::<User>([registered()])
        .when(register())
        .then_error(UserError::AlreadyExists);
}

#[test]
fn register_without_sealer_is_internal() {
    let mut ctx = crate::aggregate::Context::new(NOW);
    let err = User::default()
        .decide(register().into(), &mut ctx)
        .unwrap_err();
    assert_eq!(err, UserError::SealerMissing);
    assert_eq!(err.kind(), ErrorKind::Internal);
}

#[test]
fn set_attribute_seals_the_value_per_field() {
    let events = given::<User>([registered()])
        .when(SetAttribute {
            name: "email".into(),
            value: "alice@example.com".into(),
        })
        .events();
    let [UserEvent::AttributeSet(e)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert_eq!(e.name, "email");
    let field = aad(&user().stream(), "attribute/email");
    assert_eq!(
        test_key().open(&field, &e.value).unwrap(),
        b"alice@example.com"
    );
    assert!(
        test_key()
            .open(&aad(&user().stream(), "attribute/name"), &e.value)
            .is_err()
    );
}

#[test]
fn set_attribute_validates_name_and_value() {
    let cases = [
        (
            set_cmd(""),
            ValidationError::Empty {
                field: "attribute name",
            },
        ),
        (
            set_cmd("Email"),
            ValidationError::Charset {
                field: "attribute name",
                allowed: "a-z 0-9 _ . -",
            },
        ),
        (
            set_cmd("e mail"),
            ValidationError::Charset {
                field: "attribute name",
                allowed: "a-z 0-9 _ . -",
            },
        ),
        (
            set_cmd("é"),
            ValidationError::Charset {
                field: "attribute name",
                allowed: "a-z 0-9 _ . -",
            },
        ),
        (
            set_cmd(&"a".repeat(65)),
            ValidationError::TooLong {
                field: "attribute name",
                max: 64,
                actual: 65,
                unit: "characters",
            },
        ),
        (
            SetAttribute {
                name: "bio".into(),
                value: "é".repeat(2049),
            },
            ValidationError::TooLong {
                field: "attribute value",
                max: 4096,
                actual: 4098,
                unit: "bytes",
            },
        ),
    ];
    for (cmd, error) in cases {
        given::<User>([registered()])
            .when(cmd)
            .then_error(invalid(error));
    }
    given::<User>([registered()])
        .when(set_cmd(&"a".repeat(64)))
        .events();
    given::<User>([registered()])
        .when(set_cmd("group.admin-1_x"))
        .events();
    given::<User>([registered()])
        .when(SetAttribute {
            name: "bio".into(),
            value: "x".repeat(4096),
        })
        .events();
}

#[test]
fn at_most_sixty_four_attributes_but_overwrite_is_fine() {
    let mut history = vec![registered()];
    history.extend((0..64).map(|i| set(&format!("a{i}"))));
    given::<User>(history.clone())
        .when(set_cmd("one_more"))
        .then_error(UserError::TooManyAttributes { max: 64 });
    given::<User>(history.clone())
        .when(set_cmd("a7"))
        .then(vec![set("a7")]);
    history.push(UserEvent::AttributeRemoved(UserAttributeRemoved {
        name: "a0".into(),
    }));
    given::<User>(history)
        .when(set_cmd("one_more"))
        .then(vec![set("one_more")]);
}

#[test]
fn remove_attribute() {
    let state = given::<User>([registered(), set("email")])
        .when(RemoveAttribute {
            name: "email".into(),
        })
        .then(vec![UserEvent::AttributeRemoved(UserAttributeRemoved {
            name: "email".into(),
        })]);
    let User::Active(u) = state else { panic!() };
    assert!(u.attributes.is_empty());
    // Absent: nothing to record.
    given::<User>([registered()])
        .when(RemoveAttribute {
            name: "email".into(),
        })
        .then_nothing();
    given::<User>([registered()])
        .when(RemoveAttribute {
            name: "EMAIL".into(),
        })
        .then_error(invalid(ValidationError::Charset {
            field: "attribute name",
            allowed: "a-z 0-9 _ . -",
        }));
}

#[test]
fn commands_on_a_missing_user_are_not_found() {
    let commands: Vec<UserCommand> = vec![
        set_cmd("a").into(),
        RemoveAttribute { name: "a".into() }.into(),
        DeleteUser.into(),
    ];
    for cmd in commands {
        given_nothing::<User>()
            .when(cmd)
            .then_error(UserError::NotFound);
    }
}

#[test]
fn delete_then_everything_is_gone() {
    let state = given::<User>([registered(), set("email")])
        .when(DeleteUser)
        .then(vec![deleted()]);
    assert_eq!(state, User::Deleted { user: user() });
    let commands: Vec<UserCommand> = vec![
        register().into(),
        put(&[]).into(),
        set_cmd("a").into(),
        RemoveAttribute { name: "a".into() }.into(),
        DeleteUser.into(),
    ];
    for cmd in commands {
        given::<User>([registered(), deleted()])
            .when(cmd)
            .then_error(UserError::Deleted);
    }
}

#[test]
fn errors_and_debug_never_show_personal_data() {
    let cmd = SetAttribute {
        name: "email".into(),
        value: "alice@example.com".into(),
    };
    assert!(!format!("{cmd:?}").contains("alice"));
    assert!(!format!("{:?}", register()).contains("alice"));
    let err = UserError::Invalid(ValidationError::Userid(
        crate::ids::UseridError::ControlCharacter,
    ));
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert_eq!(UserError::AlreadyExists.kind(), ErrorKind::Conflict);
    assert_eq!(
        UserError::TooManyAttributes { max: 64 }.kind(),
        ErrorKind::Invalid
    );
    assert_eq!(UserError::NotFound.kind(), ErrorKind::NotFound);
    assert_eq!(UserError::Deleted.kind(), ErrorKind::Gone);
}

/// A realistic lifecycle, as a reviewer reads it: no userid or value appears in clear.
#[test]
fn lifecycle_snapshot() {
    const NAME: &str = "user_lifecycle";
    let t = |s: i64| Timestamp::from_millis(NOW.as_millis() + s * 1000);
    // One sealer for the whole story, as the edge would have one key per user.
    let mut sealer = test_sealer();
    let mut state = User::default();
    let mut events = Vec::new();
    let steps: Vec<(Timestamp, UserCommand)> = vec![
        (t(0), register().into()),
        (
            t(1),
            SetAttribute {
                name: "email".into(),
                value: "alice@example.com".into(),
            }
            .into(),
        ),
        (
            t(2),
            SetAttribute {
                name: "given_name".into(),
                value: "Alice".into(),
            }
            .into(),
        ),
        (
            t(3),
            SetAttribute {
                name: "groups".into(),
                value: "admins,staff".into(),
            }
            .into(),
        ),
        (
            t(4),
            RemoveAttribute {
                name: "groups".into(),
            }
            .into(),
        ),
        (
            t(5),
            RemoveAttribute {
                name: "groups".into(),
            }
            .into(),
        ),
        (t(6), DeleteUser.into()),
    ];
    for (at, cmd) in steps {
        let mut ctx = crate::aggregate::Context::with_sealer(at, &mut sealer);
        for e in state.decide(cmd, &mut ctx).unwrap() {
            state.apply(&e);
            events.push(e);
        }
    }
    let rendered: Vec<_> = events.iter().map(crate::testing::render).collect();
    let text = serde_json::to_string(&rendered).unwrap();
    assert!(!text.contains("alice") && !text.contains("Alice") && !text.contains("admins"));
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_yaml_snapshot!(NAME, rendered);
    });
}

fn put(attributes: &[(&str, &str)]) -> PutUser {
    PutUser {
        user: user(),
        userid: userid(),
        attributes: attributes
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
    }
}

/// `user.attribute_set` as the sealer produces it at its current nonce.
fn sealed_set(sealer: &mut CounterSealer, name: &str, value: &str) -> UserEvent {
    let value = sealer
        .seal(
            &aad(&user().stream(), &attribute_field(name)),
            value.as_bytes(),
        )
        .unwrap();
    UserEvent::AttributeSet(UserAttributeSet {
        name: name.into(),
        value,
    })
}

fn removed(name: &str) -> UserEvent {
    UserEvent::AttributeRemoved(UserAttributeRemoved { name: name.into() })
}

#[test]
fn put_registers_a_new_user_with_its_attributes() {
    let mut sealer = test_sealer();
    let userid = sealer
        .seal(&aad(&user().stream(), "userid"), b"alice@example.com")
        .unwrap();
    let expected = vec![
        UserEvent::Registered(UserRegistered {
            user: user(),
            userid,
        }),
        sealed_set(&mut sealer, "email", "alice@example.com"),
        sealed_set(&mut sealer, "given_name", "Alice"),
    ];
    let state = given_nothing::<User>()
        .when(put(&[
            ("given_name", "Alice"),
            ("email", "alice@example.com"),
        ]))
        .then(expected);
    let User::Active(u) = state else { panic!() };
    assert_eq!(u.user, user());
    assert_eq!(
        u.attributes.into_iter().collect::<Vec<_>>(),
        ["email", "given_name"]
    );
}

#[test]
fn put_without_attributes_registers_only() {
    given_nothing::<User>()
        .when(put(&[]))
        .then(vec![registered()]);
}

#[test]
fn put_replaces_the_attributes_of_an_existing_user() {
    let mut sealer = test_sealer();
    let expected = vec![
        sealed_set(&mut sealer, "b", "x"),
        sealed_set(&mut sealer, "c", "y"),
        removed("a"),
        removed("d"),
    ];
    let state = given::<User>([registered(), set("a"), set("b"), set("d")])
        .when(put(&[("c", "y"), ("b", "x")]))
        .then(expected);
    let User::Active(u) = state else { panic!() };
    assert_eq!(u.attributes.into_iter().collect::<Vec<_>>(), ["b", "c"]);
    // An empty map removes everything; nothing to remove, nothing to record.
    given::<User>([registered(), set("a")])
        .when(put(&[]))
        .then(vec![removed("a")]);
    given::<User>([registered()]).when(put(&[])).then_nothing();
}

#[test]
fn put_validates_every_attribute_before_emitting_anything() {
    let charset = ValidationError::Charset {
        field: "attribute name",
        allowed: "a-z 0-9 _ . -",
    };
    let long_value = "x".repeat(4097);
    let cases = [
        (put(&[("email", "a"), ("Bad", "b")]), charset.clone()),
        (
            put(&[("", "b")]),
            ValidationError::Empty {
                field: "attribute name",
            },
        ),
        (
            put(&[("bio", &long_value)]),
            ValidationError::TooLong {
                field: "attribute value",
                max: 4096,
                actual: 4097,
                unit: "bytes",
            },
        ),
    ];
    for (cmd, error) in cases {
        given_nothing::<User>()
            .when(cmd.clone())
            .then_error(invalid(error.clone()));
        given::<User>([registered(), set("a")])
            .when(cmd)
            .then_error(invalid(error));
    }
}

#[test]
fn put_counts_only_the_attributes_it_leaves() {
    let names: Vec<String> = (0..65).map(|i| format!("a{i}")).collect();
    let map = |n: usize| -> BTreeMap<String, String> {
        names
            .iter()
            .take(n)
            .map(|k| (k.clone(), "v".to_owned()))
            .collect()
    };
    given_nothing::<User>()
        .when(PutUser {
            attributes: map(65),
            ..put(&[])
        })
        .then_error(UserError::TooManyAttributes { max: 64 });
    // 64 new ones replacing 64 old ones is fine: the user ends with 64.
    let mut history = vec![registered()];
    history.extend((0..64).map(|i| set(&format!("old{i}"))));
    let events = given::<User>(history)
        .when(PutUser {
            attributes: map(64),
            ..put(&[])
        })
        .events();
    assert_eq!(events.len(), 128);
}

#[test]
fn put_must_name_the_stream_it_is_decided_on() {
    let bob = Userid::new("bob").unwrap();
    let err = given::<User>([registered()]).when(PutUser {
        user: UserRef::new(SERVER, &digest_key(), &bob),
        userid: bob,
        ..put(&[])
    });
    err.then_error(UserError::UserMismatch);
    assert_eq!(UserError::UserMismatch.kind(), ErrorKind::Invalid);
    given::<User>([registered()])
        .when(PutUser {
            user: UserRef::new(ServerId::from_bytes([0x12; 16]), &digest_key(), &userid()),
            ..put(&[])
        })
        .then_error(UserError::UserMismatch);
}

#[test]
fn put_without_sealer_is_internal() {
    let mut ctx = crate::aggregate::Context::new(NOW);
    let err = User::default()
        .decide(put(&[("email", "a")]).into(), &mut ctx)
        .unwrap_err();
    assert_eq!(err, UserError::SealerMissing);
}

#[test]
fn put_debug_shows_names_only() {
    let text = format!("{:?}", put(&[("email", "alice@example.com")]));
    assert!(text.contains("email"), "{text}");
    assert!(!text.contains("alice"), "{text}");
}
