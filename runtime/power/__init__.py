"""The power governor (POLCA, Patel et al. 2023): a pure policy shared by the live governor and
the cluster simulator, node agents and the governor actor for Ray, and the simulator."""
