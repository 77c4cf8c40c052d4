# `python -m stages.<stage>` runs this before the stage module imports torch: OpenMP reads its wait
# policy once, when torch loads (pipeline/stage.py, OPENMP_WAIT).
from pipeline.stage import configure_openmp_wait

configure_openmp_wait()
