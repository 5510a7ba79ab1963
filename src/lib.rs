//! proxy-pool: keeps a large pool of public proxies validated in PostgreSQL and
//! hands each client application the proxy most likely to work for it, from
//! memory. See ARCHITECTURE.md for the map of the modules.

pub mod config;
pub mod farm;
pub mod judge;
pub mod proxy;
