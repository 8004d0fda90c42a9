//! Service behaviour: panics, watchdog, reload, non-finite losses, policies.
