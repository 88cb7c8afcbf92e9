//! Printable forms of settings that may hold secrets.
//!
//! A database URL is printed in errors and logs so the user knows which
//! database could not be reached; its password must never be. Postgres takes
//! its settings in two forms, a URL (`postgres://user:pass@host/db?password=..`)
//! and key=value pairs (`host=db password=.. dbname=kser`), so string surgery
//! on one form leaks the other. [`database_url`] parses either with
//! `tokio_postgres::Config`, the parser the connection itself uses, and
//! rebuilds a URL from the parts that are safe to show: user, hosts, ports and
//! database name. Everything else (password, options, TLS settings) is left
//! out.
//!
//! The Kafka counterpart is [`crate::config::is_secret`]: librdkafka
//! properties whose names say they hold a secret are masked wherever kser
//! prints a Kafka setting.

use std::fmt::Write as _;

use tokio_postgres::config::{Config, Host};

/// What is printed for settings that cannot be parsed: whatever they hold
/// (a password among it) is not shown.
pub const UNPARSEABLE: &str = "<database settings that cannot be parsed>";

/// `url` (a Postgres URL or key=value settings) as a URL without secrets:
/// `host=db port=5433 user=kser password=s3cret dbname=tasks` is shown as
/// `postgres://kser@db:5433/tasks`, and
/// `postgres://kser@db/tasks?password=s3cret` as
/// `postgres://kser@db:5432/tasks` (the unit tests below hold both).
pub fn database_url(url: &str) -> String {
    match url.parse::<Config>() {
        Ok(config) => describe(&config),
        Err(_) => UNPARSEABLE.to_owned(),
    }
}

fn describe(config: &Config) -> String {
    let mut out = String::from("postgres://");
    if let Some(user) = config.get_user() {
        let _ = write!(out, "{}@", encode(user));
    }
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let mut text = match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]"),
                Host::Tcp(name) => encode(name),
                Host::Unix(path) => encode(&path.to_string_lossy()),
            };
            // One port for all hosts, or one per host.
            let port = match ports {
                [port] => Some(port),
                ports => ports.get(i),
            };
            if let Some(port) = port {
                let _ = write!(text, ":{port}");
            }
            text
        })
        .collect();
    out.push_str(&hosts.join(","));
    if let Some(dbname) = config.get_dbname() {
        let _ = write!(out, "/{}", encode(dbname));
    }
    out
}

/// Percent-encodes what would change the meaning of a URL part.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || "-._~".contains(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{byte:02X}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-pw";

    #[test]
    fn url_form_keeps_user_host_port_and_database() {
        assert_eq!(
            database_url(&format!("postgres://kser:{SECRET}@db:5432/kser")),
            "postgres://kser@db:5432/kser"
        );
        assert_eq!(
            database_url("postgresql://127.0.0.1/kser"),
            "postgres://127.0.0.1:5432/kser"
        );
    }

    #[test]
    fn no_form_of_password_is_printed() {
        for url in [
            format!("postgres://kser:{SECRET}@db:5432/kser"),
            format!("postgres://kser@db:5432/kser?password={SECRET}"),
            format!("postgres://kser@db/kser?sslmode=disable&password={SECRET}"),
            format!("host=db port=5432 user=kser password={SECRET} dbname=kser"),
            format!("host=db user=kser password='{SECRET} with spaces' dbname=kser"),
            format!("postgres://kser:{SECRET}@db1:5432,db2:5433/kser"),
            format!("postgres://kser:{SECRET}@db/kser?options=-c%20search_path%3D{SECRET}"),
        ] {
            let shown = database_url(&url);
            assert!(!shown.contains(SECRET), "{url} -> {shown}");
            assert!(shown.starts_with("postgres://"), "{url} -> {shown}");
        }
    }

    #[test]
    fn a_password_in_the_query_is_dropped() {
        assert_eq!(
            database_url(&format!("postgres://kser@db/tasks?password={SECRET}")),
            "postgres://kser@db:5432/tasks"
        );
    }

    #[test]
    fn key_value_form_reads_like_a_url() {
        assert_eq!(
            database_url(&format!(
                "host=db port=5433 user=kser password={SECRET} dbname=tasks"
            )),
            "postgres://kser@db:5433/tasks"
        );
        assert_eq!(
            database_url("host=/var/run/postgresql dbname=kser"),
            "postgres://%2Fvar%2Frun%2Fpostgresql/kser"
        );
    }

    #[test]
    fn several_hosts_keep_their_ports() {
        assert_eq!(
            database_url(&format!("postgres://kser:{SECRET}@db1:5432,db2:5433/kser")),
            "postgres://kser@db1:5432,db2:5433/kser"
        );
    }

    #[test]
    fn what_cannot_be_parsed_is_not_shown() {
        for url in [
            format!("postgres://kser:{SECRET}@db/kser?nonsense={SECRET}"),
            format!("host=db password={SECRET} unknown={SECRET}"),
            format!("not a url {SECRET}"),
        ] {
            assert_eq!(database_url(&url), UNPARSEABLE, "{url}");
        }
    }
}
