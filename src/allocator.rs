//! With the cargo feature `jemalloc`: jemalloc is the global allocator of
//! the binary kser is built into (a user's worker binary, `kser`, the
//! examples). A worker allocates and frees a few dozen small blocks per
//! task, on whichever runtime thread the task lands; with glibc's malloc,
//! allocating and freeing them (arena locks, consolidating free chunks) was
//! a fifth of the worker's CPU, and with jemalloc the worker spends about a
//! fifth less CPU per task (README, "Performance"). A binary that sets an
//! allocator of its own leaves the feature off.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
