//! PostgreSQL on one host: configuration text (`conf`, pure), password verifiers (`scram`,
//! pure), the server process and its tools (`process`), the SQL the agent needs (`sql`), and
//! PgBouncer in front of a worker (`pgbouncer`).

pub mod conf;
pub mod pgbouncer;
pub mod process;
pub mod scram;
pub mod sql;
pub mod timeline;
