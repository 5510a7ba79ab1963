//! proxy-pool: keeps a large pool of public proxies validated in PostgreSQL and
//! hands each client application the proxy most likely to work for it, from
//! memory. See ARCHITECTURE.md for the map of the modules.

pub mod api;
pub mod app;
pub mod cli;
pub mod commands;
pub mod config;
pub mod fetcher;
pub mod health;
pub mod http;
pub mod judge;
pub mod logging;
pub mod metrics;
pub mod persist;
pub mod proxy;
pub mod scheduler;
pub mod secret;
pub mod shutdown;
pub mod snapshot;
pub mod state;
pub mod stats_table;
pub mod store;
pub mod supervisor;
pub mod validator;
