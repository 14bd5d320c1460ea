"""`make figures`: every paper figure and results table from results/runs.parquet (see ksd.figures).

python scripts/make_figures.py [--results results]
"""

from ksd.figures import main

if __name__ == "__main__":
    main()
