//! pglifeguard: a PostgreSQL-aware TCP proxy for streaming-replication clusters.
//!
//! The path of a client's bytes: [`server`] accepts the socket and hands it to [`client`],
//! which reads the [`startup`] packet, runs [`auth`], borrows a backend from [`pool`]
//! (opened by [`backend`] on the node [`cluster`] names as primary) and then [`relay`]s
//! bytes both ways, framed by [`protocol`]. [`health`] checks every node and [`failover`] turns its reports into the cluster view
//! (running [`hooks`], persisting [`status_file`]);
//! [`admin`] and [`metrics`] expose it. Several proxies agree on the cluster and on one
//! leader through the [`watchdog`] (Raft), and the leader holds the virtual IP ([`vip`]).
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod console;
pub mod config;
pub mod demo;
pub mod drill;
pub mod failover;
pub mod health;
pub mod hooks;
pub mod leadership;
pub mod localcluster;
pub mod metrics;
pub mod net;
pub mod netlab;
pub mod pool;
pub mod protocol;
pub mod relay;
pub mod scram;
pub mod server;
pub mod startup;
pub mod status_file;
#[cfg(test)]
mod test_support;
pub mod vip;
pub mod watchdog;
