"""The whole series in one resumable run: baseline, HPO, supernet, search, retrain, results, report.

`load_pipeline_config` resolves the preset, a user file and `--set` overrides once into a checked
`PipelineConfig` and its `Plan`; `run_pipeline(config, "runs/NAME")` runs the stages in order. Each
stage is an object (`Stage`: its settings, the units it counts, `run`) with its own subdirectory;
it takes the results of the stages before it in memory and writes the files that let it be run,
resumed or reported alone:

    baseline/  the recipe at the pipeline's budget (`train` section), test accuracy
    hpo/       an HPO study over the `hpo.space`, trials validated on held-out images; best.json
    hpo_best/  best.json retrained at the `train` budget, test accuracy
    supernet/  a SPOS supernet with the HPO best's widths and learning rate
    search/    evolutionary (or random, NSGA-II) search over it; arch/top_1.json (its best) ...
    retrain/   the top architectures from scratch with the HPO best's hyper-parameters
    nas_eval/  (if `nas_eval.trials` > 0) supernet vs standalone ranking of random subnets
    results.json and report/report.html: baseline vs HPO best vs NAS best

Final runs (baseline, hpo_best, retrain) train on all `subset` training images and report test
accuracy; the searches select on the `holdout` images set aside from them, never on the test set.

Each stage writes `stage.json` when it starts (what it was started with) and again, with
`finished`, when it is done. Running the same command again skips finished stages and resumes
the interrupted one from what it saved: HPO and search studies keep their finished trials
(a trial cut short is retried), the supernet continues from its last checkpoint, retraining
keeps the finished runs; a training stage cut short starts again. A stage that was started with
other settings is refused rather than mixed.

Settings come from the preset's YAML files (`effcifar/presets/quick.yaml`; `medium.yaml`, only
what differs, over quick's; `full.yaml`), a user file over them and `SECTION.FIELD=VALUE`
overrides; every section holds fields of that stage's own config class, so each stage can also be
run alone with the same values.
"""

from effcifar.pipeline.plan import STAGES, PipelineConfig, Plan, load_pipeline_config, nest
from effcifar.pipeline.stages import Monitor, Pipeline, PipelineResult, Stage, run_pipeline

__all__ = ["STAGES", "Monitor", "Pipeline", "PipelineConfig", "PipelineResult", "Plan", "Stage", "load_pipeline_config",
           "nest", "run_pipeline"]
