//! PostgreSQL on one host: configuration text (`conf`, pure), password verifiers (`scram`,
//! pure), the server process and its tools (`process`), and the SQL the agent needs (`sql`).

pub mod conf;
pub mod process;
pub mod scram;
pub mod sql;
