//! Placeholder until the operator lands.
