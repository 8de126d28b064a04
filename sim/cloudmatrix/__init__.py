"""DeepSeek-R1 on a CloudMatrix384-style supernode: the network, expert imbalance, EP-group step costs, the
deployments (static PD disaggregation, flex co-location) and the experiments `vdevctl bench cloudmatrix` runs."""
