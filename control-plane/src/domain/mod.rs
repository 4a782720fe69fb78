//! Pure rules: no I/O here, so every rule is testable without a database.

pub mod accounts;
pub mod password;
pub mod payments;
pub mod tokens;
