//! Which database errors a retry can cure, decided by SQLSTATE.
//!
//! A write that failed because the database or the connection failed (a
//! restart, a lost connection, a deadlock, a full disk) may succeed when
//! tried again, so the worker waits it out. A write that failed because of
//! what it carries (a value Postgres refuses, a statement too large for the
//! protocol) fails the same way every time: retrying it would stall the
//! worker forever, so the worker splits the batch to find the rows at fault
//! and records them FAILED instead.
//!
//! **Where the SQLSTATE comes from.** diesel-async 0.9 (`src/pg/error_helper.rs`)
//! maps tokio-postgres' `DbError` to diesel's `DatabaseErrorKind`, which
//! names only a handful of codes (class 23, 40001, 25006) and calls every
//! other one `Unknown`; diesel 2.3's `DatabaseErrorInformation` has no
//! accessor for the code, and the wrapper holding the `DbError` is private,
//! so the code itself is lost. [`StoreError::recovery`] therefore uses the
//! kind where diesel kept it and otherwise reconstructs the code from
//! Postgres' primary message ([`guess_sqlstate`]), which is English unless
//! the server's `lc_messages` says otherwise. A message it does not know is
//! [`Recovery::Unclassified`]: the worker then tries a known-good write
//! (rolled back) and lets its outcome decide, so neither an outage is taken
//! for a bad row (recording rows FAILED that could have been stored) nor a
//! bad row for an outage (stalling the worker on it forever). Errors raised on the client side carry no
//! SQLSTATE at all; tokio-postgres names their kind in fixed words, which
//! [`client_recovery`] reads. Once diesel exposes the code (diesel-rs/diesel
//! PR 5232), [`of_sqlstate`] takes it directly.

use diesel::result::{DatabaseErrorKind, Error};

use super::database::StoreError;

/// What retrying a failed write can achieve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Recovery {
    /// The database or the connection failed, not the statement: the same
    /// write may succeed later. Wait and retry.
    Transient,
    /// The statement cannot succeed as it is (a value Postgres refuses, a
    /// statement too large): retrying changes nothing. Find the rows at
    /// fault and record them without the offending values.
    Permanent,
    /// A server error kser cannot place: its SQLSTATE is lost and its words
    /// are not ones kser knows (a server whose `lc_messages` is not English,
    /// a message from a trigger or an extension). Ask the database: if a
    /// known-good write goes through (`Store::probe_write`), the statement
    /// is at fault (as [`Permanent`](Self::Permanent)); if not, the database
    /// is (as [`Transient`](Self::Transient)).
    Unclassified,
}

/// How an error of SQLSTATE `code` recovers.
///
/// Permanent: class 22 (data exception: invalid text, `\u0000` in jsonb,
/// out-of-range numbers and timestamps, invalid encoding), 23 (integrity
/// constraint), 54 (program limit exceeded: a value or index row too
/// large), 0A (feature not supported) and P0 (an error raised by a trigger).
///
/// Transient, everything else, in particular class 08 (connection), 40
/// (serialization failure, deadlock), 53 (insufficient resources: too many
/// connections, out of memory, disk full), 55 (lock not available), 57
/// (operator intervention: admin shutdown, crash shutdown, cannot connect
/// now, statement timeout), 58 and XX (system and internal errors), and 42
/// and 25: a missing table or privilege, or a read-only standby, is fixed by
/// an operator, never by a row; recording rows FAILED for it would lose them.
pub(crate) fn of_sqlstate(code: &str) -> Recovery {
    match code.get(..2) {
        Some("22" | "23" | "54" | "0A" | "P0") => Recovery::Permanent,
        _ => Recovery::Transient,
    }
}

/// The SQLSTATE of a server error, reconstructed from its primary message
/// (see the module docs for why): `None` for a message it does not know.
pub(crate) fn guess_sqlstate(message: &str) -> Option<&'static str> {
    const KNOWN: &[(&str, &str)] = &[
        // 22: data exception.
        ("unsupported Unicode escape sequence", "22P05"),
        ("invalid byte sequence for encoding", "22021"),
        ("has no equivalent in encoding", "22P05"),
        ("invalid input syntax", "22P02"),
        ("value too long for type", "22001"),
        ("timestamp out of range", "22008"),
        ("date out of range", "22008"),
        ("date/time field value out of range", "22008"),
        ("out of range for type", "22003"),
        ("value out of range", "22003"),
        ("integer out of range", "22003"),
        ("out of range", "22003"),
        ("division by zero", "22012"),
        ("null character not permitted", "22021"),
        ("invalid escape string", "22025"),
        ("cannot be converted to text", "22P05"),
        // 54: program limit exceeded.
        ("index row size", "54000"),
        ("index row requires", "54000"),
        ("exceeds the maximum", "54000"),
        ("string too long to represent as jsonb string", "54000"),
        ("array size exceeds the maximum allowed", "54000"),
        ("number of parameters must be between", "54000"),
        ("total size of jsonb", "54000"),
        ("row is too big", "54000"),
        ("out of memory: cannot enlarge string buffer", "54000"),
        // Postgres says XX000 for a value over 1 GB, but it is the value's
        // fault, not the server's.
        ("invalid memory alloc request size", "54000"),
        // 08, 40, 53, 55, 57: worth waiting out.
        ("terminating connection", "57P01"),
        ("the database system is shutting down", "57P03"),
        ("the database system is starting up", "57P03"),
        ("the database system is in recovery mode", "57P03"),
        ("canceling statement due to statement timeout", "57014"),
        ("canceling statement due to user request", "57014"),
        ("canceling statement due to lock timeout", "55P03"),
        ("could not obtain lock", "55P03"),
        ("deadlock detected", "40P01"),
        ("could not serialize access", "40001"),
        ("too many connections", "53300"),
        ("remaining connection slots are reserved", "53300"),
        ("could not extend file", "53100"),
        ("No space left on device", "53100"),
        ("out of memory", "53200"),
        ("out of shared memory", "53200"),
        ("server closed the connection", "08006"),
        ("connection to server", "08006"),
        ("no connection to the server", "08003"),
        // 42: the schema or a privilege; an operator's job.
        ("does not exist", "42P01"),
        ("permission denied", "42501"),
    ];
    KNOWN
        .iter()
        .find(|(words, _)| message.contains(words))
        .map(|(_, code)| *code)
}

/// How an error raised on the client side (no SQLSTATE: diesel-async calls
/// it `UnableToSendCommand` and keeps only tokio-postgres' words for its
/// kind) recovers. A statement the client cannot encode (more than 65,535
/// bind parameters, a message over 1 GiB) or a value it cannot serialize
/// fails again every time; a connection that broke may come back.
pub(crate) fn client_recovery(message: &str) -> Recovery {
    const PERMANENT: &[&str] = &[
        // tokio-postgres `Kind::Encode`: the statement does not fit the
        // protocol (too many parameters, a message over 1 GiB).
        "error encoding message to server",
        // `Kind::ToSql`: a value that cannot be sent.
        "error serializing parameter",
        // `Kind::Parameters`.
        "parameters but got",
        "value too large to transmit",
    ];
    if PERMANENT.iter().any(|words| message.contains(words)) {
        Recovery::Permanent
    } else {
        Recovery::Transient
    }
}

impl StoreError {
    /// Whether retrying the same write can succeed: see [`Recovery`] and the
    /// module docs of `store::recovery` for how it is decided.
    pub fn recovery(&self) -> Recovery {
        match self {
            // An operator's fix (a migration, a GRANT) cures these.
            Self::Connect { .. }
            | Self::Migration(_)
            | Self::NotMigrated { .. }
            | Self::Privileges { .. } => Recovery::Transient,
            Self::NotFound(_) | Self::Conflict(_) => Recovery::Permanent,
            Self::Query(err) => query_recovery(err),
        }
    }

    /// Whether the statement itself cannot succeed, so retrying it is
    /// useless ([`Recovery::Permanent`]).
    pub fn is_permanent(&self) -> bool {
        self.recovery() == Recovery::Permanent
    }
}

fn query_recovery(err: &Error) -> Recovery {
    match err {
        Error::DatabaseError(kind, info) => match kind {
            // The kinds diesel-async maps from a SQLSTATE (class 23).
            DatabaseErrorKind::UniqueViolation
            | DatabaseErrorKind::ForeignKeyViolation
            | DatabaseErrorKind::RestrictViolation
            | DatabaseErrorKind::ExclusionViolation
            | DatabaseErrorKind::NotNullViolation
            | DatabaseErrorKind::CheckViolation => of_sqlstate("23000"),
            DatabaseErrorKind::SerializationFailure => of_sqlstate("40001"),
            DatabaseErrorKind::ReadOnlyTransaction => of_sqlstate("25006"),
            DatabaseErrorKind::ClosedConnection => of_sqlstate("08006"),
            DatabaseErrorKind::UnableToSendCommand => client_recovery(info.message()),
            // `Unknown`: a server error whose code diesel dropped.
            _ => guess_sqlstate(info.message()).map_or(Recovery::Unclassified, of_sqlstate),
        },
        // A value diesel could not serialize, or a query it could not build:
        // the same every time.
        Error::SerializationError(_) | Error::QueryBuilderError(_) => Recovery::Permanent,
        // A row that cannot be read back, a missing row: the same every time.
        Error::DeserializationError(_) | Error::NotFound => Recovery::Permanent,
        // A broken transaction, a failed commit or rollback: the connection.
        _ => Recovery::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(kind: DatabaseErrorKind, message: &str) -> StoreError {
        StoreError::Query(Error::DatabaseError(kind, Box::new(message.to_owned())))
    }

    fn unknown(message: &str) -> Recovery {
        server(DatabaseErrorKind::Unknown, message).recovery()
    }

    #[test]
    fn sqlstate_classes() {
        for code in [
            "22P05", "22021", "22001", "22008", "22003", "23505", "23503", "54000", "54001",
            "0A000", "P0001",
        ] {
            assert_eq!(of_sqlstate(code), Recovery::Permanent, "{code}");
        }
        for code in [
            "08006", "08003", "40001", "40P01", "57P01", "57P02", "57P03", "57014", "53300",
            "53100", "53200", "55P03", "58030", "XX000", "42P01", "42501", "25006", "",
        ] {
            assert_eq!(of_sqlstate(code), Recovery::Transient, "{code}");
        }
    }

    #[test]
    fn server_errors_without_their_code() {
        // Postgres' own words for each class.
        for message in [
            "unsupported Unicode escape sequence",
            "invalid byte sequence for encoding \"UTF8\": 0x00",
            "invalid input syntax for type json",
            "timestamp out of range",
            "index row size 3016 exceeds btree version 4 maximum 2704 for index \"tasks_pkey\"",
            "total size of jsonb object elements exceeds the maximum of 268435455 bytes",
            "invalid memory alloc request size 1073741824",
            "value \"99999999999\" is out of range for type integer",
            "integer out of range",
        ] {
            assert_eq!(unknown(message), Recovery::Permanent, "{message}");
        }
        for message in [
            "terminating connection due to administrator command",
            "the database system is shutting down",
            "deadlock detected",
            "canceling statement due to statement timeout",
            "sorry, too many clients already: too many connections",
            "could not extend file \"base/16384/16385\": No space left on device",
            "out of memory",
            "relation \"kser.tasks\" does not exist",
            "permission denied for table tasks",
        ] {
            assert_eq!(unknown(message), Recovery::Transient, "{message}");
        }
        // Not English, or words kser never saw: the database decides.
        for message in [
            "something Postgres may say one day",
            "FEHLER:  Relation »kser.tasks« existiert nicht",
        ] {
            assert_eq!(unknown(message), Recovery::Unclassified, "{message}");
            assert!(!unknown(message).eq(&Recovery::Permanent));
        }
    }

    #[test]
    fn kinds_diesel_kept() {
        use DatabaseErrorKind as K;
        for kind in [
            K::UniqueViolation,
            K::ForeignKeyViolation,
            K::CheckViolation,
        ] {
            assert!(server(kind, "violates").is_permanent());
        }
        for kind in [
            K::SerializationFailure,
            K::ReadOnlyTransaction,
            K::ClosedConnection,
        ] {
            assert!(!server(kind, "x").is_permanent());
        }
    }

    #[test]
    fn client_side_errors() {
        let send = |message| server(DatabaseErrorKind::UnableToSendCommand, message);
        assert!(send("error encoding message to server").is_permanent());
        assert!(send("error serializing parameter 3").is_permanent());
        assert!(!send("connection closed").is_permanent());
        assert!(!send("error communicating with the server").is_permanent());
        assert!(!send("timeout waiting for server").is_permanent());
        let connect = StoreError::Connect {
            url: "postgres://db".into(),
            reason: "refused".into(),
        };
        assert!(!connect.is_permanent());
        let json = StoreError::Query(Error::SerializationError("bad".into()));
        assert!(json.is_permanent());
    }
}
