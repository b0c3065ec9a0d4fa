//! shopstream-publish: typed publishers for the platform's events and a
//! realistic, seeded load generator.

pub mod cli;
pub mod generator;
pub mod publisher;
