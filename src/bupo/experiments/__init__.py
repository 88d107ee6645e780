"""Studies built on the library: ``bupo demo`` and ``bupo reproduce``, the steps they share, their report.

- :mod:`bupo.experiments.steps`: analyse, train one run, read its evaluations (each step resumable), paired CIs;
- :mod:`bupo.experiments.demo`: ``bupo demo`` (:func:`~bupo.experiments.demo.run_demo`), the paper in miniature;
- :mod:`bupo.experiments.reproduce`: ``bupo reproduce``, seeds, ablations, feature refinement on the bundled model;
- :mod:`bupo.experiments.real_model`: ``bupo reproduce --model``, GRPO vs BuPO on a real checkpoint;
- :mod:`bupo.experiments.report`: the self-contained HTML report both write.

The library (analysis, training, evaluation, models) never imports from here. Each module imports only the standard
library at top level (so ``bupo --help`` stays fast), except the report, which is imported when a report is written.
"""
