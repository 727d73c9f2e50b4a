//! Sync clients: registrations and acknowledged state vectors (filled in by the sync API).
