"""Train a cogview task: python train.py task=t2i [key=value ...] [-m sweeps] (= cogview train).

The configs live in cogview/conf/ (train.yaml and its groups); see cogview.training.
"""

from cogview.training import main

if __name__ == "__main__":
    main()
