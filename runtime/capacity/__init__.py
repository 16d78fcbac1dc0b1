"""Energy-aware capacity: replicas and clocks per expert from load, profiles, SLOs and the power budget."""
