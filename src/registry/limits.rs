//! Limits across the fleet, as declared: resource pools
//! ([`Registry::pool`]), each task's [`MAX_CONCURRENCY`](crate::Task::MAX_CONCURRENCY)
//! and [`ACQUIRES`](crate::Task::ACQUIRES), checked before a worker starts.
//! `store/pools.rs` enforces them.

use std::collections::BTreeMap;

use super::{Registry, RegistryError};

impl Registry {
    /// Declares resource pool `name` with `capacity` units, shared by the
    /// whole fleet: a task that lists it in [`Task::ACQUIRES`](crate::Task::ACQUIRES) runs only
    /// while it holds its units. Every worker declaring a pool should give
    /// it the same capacity; the worker started last sets it in Postgres.
    ///
    /// ```
    /// let mut registry = kser::Registry::new();
    /// registry.pool("gpu", 2)?;
    /// # Ok::<(), kser::RegistryError>(())
    /// ```
    pub fn pool(&mut self, name: &str, capacity: u32) -> Result<&mut Self, RegistryError> {
        if name.is_empty() || name.starts_with("entrypoint:") {
            return Err(RegistryError::Limit(format!(
                "pool name '{name}' is not allowed: names starting with 'entrypoint:' hold MAX_CONCURRENCY limits"
            )));
        }
        if capacity == 0 {
            return Err(RegistryError::Limit(format!(
                "pool '{name}' has capacity 0: no task needing it could ever run"
            )));
        }
        let capacity = i32::try_from(capacity).unwrap_or(i32::MAX);
        match self.pools.get(name) {
            Some(declared) if *declared != capacity => Err(RegistryError::Limit(format!(
                "pool '{name}' is declared twice, with capacities {declared} and {capacity}"
            ))),
            _ => {
                self.pools.insert(name.to_owned(), capacity);
                Ok(self)
            }
        }
    }

    /// Records what task `entrypoint` needs a lease on before it runs.
    pub(super) fn limit(
        &mut self,
        entrypoint: &'static str,
        max_concurrency: Option<u32>,
        acquires: &'static [(&'static str, u32)],
    ) -> Result<(), RegistryError> {
        let mut needs = Vec::new();
        if let Some(max) = max_concurrency {
            if max == 0 {
                return Err(RegistryError::Limit(format!(
                    "{entrypoint} has MAX_CONCURRENCY 0: it could never run"
                )));
            }
            let pool = crate::store::entrypoint_pool(entrypoint);
            self.pools
                .insert(pool.clone(), i32::try_from(max).unwrap_or(i32::MAX));
            needs.push((pool, 1));
        }
        for (pool, units) in acquires {
            if *units == 0 {
                return Err(RegistryError::Limit(format!(
                    "{entrypoint} acquires 0 units of '{pool}'"
                )));
            }
            if needs.iter().any(|(name, _)| name == pool) {
                return Err(RegistryError::Limit(format!(
                    "{entrypoint} acquires '{pool}' twice"
                )));
            }
            needs.push((
                (*pool).to_owned(),
                i32::try_from(*units).unwrap_or(i32::MAX),
            ));
        }
        if !needs.is_empty() {
            self.needs.insert(entrypoint, needs);
        }
        Ok(())
    }

    /// Checks that every pool a task acquires is declared with
    /// [`pool`](Self::pool) and has room for one run: a worker refuses to
    /// start otherwise, since such a task would wait forever.
    pub fn check_limits(&self) -> Result<(), RegistryError> {
        for (entrypoint, needs) in &self.needs {
            for (pool, units) in needs {
                match self.pools.get(pool) {
                    None => {
                        return Err(RegistryError::Limit(format!(
                            "{entrypoint} acquires pool '{pool}', which is not declared: add registry.pool(\"{pool}\", CAPACITY)"
                        )));
                    }
                    Some(capacity) if units > capacity => {
                        return Err(RegistryError::Limit(format!(
                            "{entrypoint} acquires {units} units of pool '{pool}', which has {capacity}: it could never run"
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// The pools task `entrypoint` needs a lease on, with units; empty for
    /// an unlimited or unknown one.
    pub(crate) fn needs(&self, entrypoint: &str) -> &[(String, i32)] {
        self.needs.get(entrypoint).map_or(&[], Vec::as_slice)
    }

    /// Whether any task has a limit.
    pub(crate) fn has_limits(&self) -> bool {
        !self.needs.is_empty()
    }

    /// Every pool this registry declares, with its capacity.
    pub(crate) fn pools(&self) -> &BTreeMap<String, i32> {
        &self.pools
    }
}
