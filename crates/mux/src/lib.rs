//! Sans-IO stream multiplexer (placeholder until the session lands).
