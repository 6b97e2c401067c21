"""Regenerates the tables of doc/validation/real_tissue.md.

``--quick``: ActiveAx alone (half a minute); needs the dmipy 1.0.5 files, and
the tests skip it without them (-m slow).

Prediction of held-out measurements: the ISBI 2015 white-matter voxels.

The ISBI 2015 challenge (Ferizi et al., NMR Biomed 2017) gave teams 3,612
measurements of six genu and six fornix voxels and ranked their models by
how well they predicted measurements of the same voxels at shells they had
not seen. Those held-out measurements are not public; the dmipy 1.0.5 files
hold the 3,612 (``dipy_spinverse.data.read_isbi2015``: twelve echo times,
each one PGSE timing with three gradient strengths and its own b = 0).

The split here, as close to the challenge's as the public files allow:
each timing's middle gradient strength is held out (``--held_out middle``:
interpolation in q, at every diffusion time) or its strongest
(``--held_out strongest``: extrapolation, harder); the models are fitted on
the rest, every b = 0 kept. The challenge held out whole shells too, but
others than these.

The metric is the challenge's: the sum of squared errors between the
measured signals and the Rician expectation of the prediction,
``sqrt(S^2 + sigma^2)``, over the noise variance, here divided by the number
of held-out measurements (1 is a prediction as good as the noise allows).
The noise is each voxel's, from the spread of its b = 0 volumes within each
echo time (about 31 per echo time). Each prediction is scaled by the b = 0
of its own echo time (the T2 weighting the models do not model).

``--seed`` seeds torch's global generator (the fits draw nothing else at
random). Run::

    python benchmarks/isbi_prediction.py
    python benchmarks/isbi_prediction.py --held_out strongest
"""

import platform
import time

import harness
import numpy as np
import torch

from dipy_spinverse.compartments import (
    ActiveAxModel,
    ExchangeModel,
    NoddiModel,
    ZcdModel,
)
from dipy_spinverse.data import read_isbi2015
from dipy_spinverse.io.datasets import held_out_shells, subset_table

MODELS = {
    "ActiveAx": lambda g: ActiveAxModel(g),
    "ZCD": lambda g: ZcdModel(g),
    "NODDI": lambda g: NoddiModel(g),
    "Exchange": lambda g: ExchangeModel(g),
}


def main(argv=None):
    parser = harness.parser(__doc__, seed=0)
    parser.add_argument("--held_out", choices=("middle", "strongest"), default="middle")
    parser.add_argument("--dmipy", default=None, help="dmipy installation or wheel")
    args = parser.parse_args(argv)
    models = dict(list(MODELS.items())[:1]) if args.quick else MODELS  # ActiveAx
    torch.manual_seed(args.seed)
    isbi = read_isbi2015(path=args.dmipy)
    data = isbi.data.reshape(-1, isbi.data.shape[-1])
    region = isbi.histology["region"].ravel()
    test = held_out_shells(isbi, args.held_out)
    sigma, levels = isbi.repeated_b0_noise()
    train_table = subset_table(isbi.gtab, ~test)
    test_table = subset_table(isbi.gtab, test)
    print(
        f"{isbi.name}: {len(data)} voxels; fitted on {int((~test).sum())} "
        f"measurements, {int(test.sum())} held out ({args.held_out} gradient "
        f"strength of each timing); SNR of the b = 0 (median): "
        f"{np.median(levels[:, isbi.gtab.b0s_mask].mean(-1) / sigma):.0f}. "
        f"Machine: {platform.machine()}"
    )
    titles = ["model", "genu", "fornix", "all", "fit (s)"]
    print("\n" + harness.head([*titles, "diameter genu / fornix (um)"], spaced=True))
    for name, build in models.items():
        model = build(train_table)
        start = time.perf_counter()
        fit = model.fit(data[:, ~test])
        seconds = time.perf_counter() - start
        # The model's normalised signal, scaled by each volume's own b = 0.
        shape = np.asarray(fit.predict(test_table, S0=1.0)).reshape(len(data), -1)
        predicted = shape * levels[:, test]
        expected = np.sqrt(predicted**2 + sigma[:, None] ** 2)
        score = ((expected - data[:, test]) ** 2).mean(-1) / sigma**2
        cells = [f"{np.median(score[region == r]):.1f}" for r in (0, 1)]
        diameter = "--"
        if hasattr(fit, "diameter"):
            d = np.asarray(fit.diameter).ravel()
            diameter = " / ".join(f"{np.median(d[region == r]):.1f}" for r in (0, 1))
        scores = [*cells, f"{np.median(score):.1f}"]
        print(harness.row([name, *scores, f"{seconds:.1f}", diameter]))
    print(
        "\nMedian over the voxels of the mean squared prediction error over "
        "the noise variance (1: as good as the noise allows)."
    )


if __name__ == "__main__":
    main()
