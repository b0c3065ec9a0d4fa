//! shopstream-publish: typed publishers and the load generator. The
//! publishers and the generator arrive with their own issue; this crate holds
//! the workspace's place for them so the layout in DESIGN.md is real.
