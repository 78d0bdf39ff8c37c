//! redis-streamd: one consume loop per Redis stream, one handler process per entry.
//!
//! The binary (`main.rs`) only parses the command line and maps errors to exit codes;
//! everything it runs lives in these modules so the loops can be driven from tests.

pub mod config;
pub mod handler;
