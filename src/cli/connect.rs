//! Opening the store for a command, from `--database-url` or `DATABASE_URL`.

use anyhow::Context as _;

use crate::store::Store;

/// A store for a command that reads or writes kser's tables: it must be
/// migrated, else the error says to run `kser migrate`.
pub(super) async fn connect(database_url: &Option<String>) -> anyhow::Result<Store> {
    let store = connect_sized(database_url, 8).await?;
    store.check_migrated().await?;
    Ok(store)
}

/// A store with at most `connections` connections, from `--database-url`
/// or `DATABASE_URL`.
pub(super) async fn connect_sized(
    database_url: &Option<String>,
    connections: usize,
) -> anyhow::Result<Store> {
    let url = database_url
        .as_deref()
        .context("no database configured: set DATABASE_URL or pass --database-url")?;
    Ok(Store::connect(url, connections).await?)
}
