"""rlhf-lab's Hydra configuration tree, shipped in the wheel as the package `rlhf_conf`."""
