"""Run a trained cogview model: python infer.py task=t2i ckpt=<export> ... (= cogview infer).

The configs live in cogview/conf/inference/; see cogview.inference.
"""

from cogview.inference import main

if __name__ == "__main__":
    main()
