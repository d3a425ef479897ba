//! Local imitation of the Vers edge.
