//! End-to-end tests: real PostgreSQL clusters, real clients, the proxy in between.

mod common;

mod auth;
mod bad_input;
mod config;
mod demo;
mod failover;
mod jdbc;
mod pgbench;
mod pooling;
mod protocol;
mod vip;
mod watchdog;
