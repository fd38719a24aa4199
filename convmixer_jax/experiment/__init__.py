"""The paper's experiment (Table 1, Fig. 4, Fig. 5, key space) as one function."""
