//! PostgreSQL on one host: configuration text (`conf`, pure), the server process and its
//! tools (`process`), and the SQL the agent needs (`sql`).

pub mod conf;
pub mod process;
pub mod sql;
