"""Progress of a fit: the bar over the voxels, and the inversion callback
that moves it through a chunk as the face fit and the label search go."""

from tqdm import tqdm

__all__ = ["progress_bar", "chunk_progress"]


def progress_bar(total, verbose):
    """The progress bar over ``total`` voxels (hidden unless ``verbose``).

    Parameters
    ----------
    total : int
        The voxels to fit.
    verbose : bool
        Show the bar.

    Returns
    -------
    tqdm.tqdm
        The bar, counting (fractions of) voxels.
    """
    return tqdm(
        total=total,
        disable=not verbose,
        desc="Fitting Spinverse",
        unit="voxel",
        # Fractions of a voxel: a chunk moves on as its voxels are fitted.
        bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}{postfix}]",
    )


def chunk_progress(bar, config, n_rows, shown):
    """Inversion callback moving the bar through a chunk of ``n_rows`` voxels.

    The face fit moves the bar through its share of the chunk iteration by
    iteration (all of it, or half when the label search follows); the label
    search moves it by a voxel's other half when that voxel's search ends
    (when the search reports it, ``{"voxel_done": index}``) and counts its
    steps on the bar. ``shown[0]`` is what the bar shows of this chunk; the
    runner completes the chunk when it is stored.

    Parameters
    ----------
    bar : tqdm.tqdm
        The fit's progress bar (:func:`progress_bar`).
    config : InversionConfig
        The fit's inversion configuration.
    n_rows : int
        The voxels in the chunk.
    shown : list of float
        One entry: how much of the chunk the bar shows (updated in place).

    Returns
    -------
    callable
        ``callback(iteration, permeability, losses)`` for the inversion.
    """
    face_share = 0.5 if config.searches_labels else 1.0
    steps = [0, set()]  # search steps so far, voxels whose search ended

    base = bar.n  # voxels stored before this chunk

    def move(position):
        position = min(position, n_rows)
        if position > shown[0]:
            bar.update(position - shown[0])
            # Set, not summed: sums of fractions could pass the chunk's end.
            bar.n = base + position
            shown[0] = position

    def callback(iteration, permeability, losses):
        if "voxel_done" in losses:
            steps[1].add(losses["voxel_done"])
            move(n_rows * face_share + len(steps[1]) * (1 - face_share))
            return
        if "search" in losses:  # a step of one voxel's label search
            steps[0] += 1
            text = (
                f"label search: {steps[0]} steps, voxel {losses['voxel'] + 1}/"
                f"{n_rows} at step {iteration + 1}, loss {losses['search']:.3g}"
            )
            bar.set_postfix_str(text, refresh=steps[0] % 10 == 0)
            return
        text = (
            f"face fit: iteration {iteration + 1}/{config.face.n_iterations}, "
            f"data loss {losses.get('data', float('nan')):.3g}"
        )
        bar.set_postfix_str(text, refresh=False)
        move(n_rows * face_share * min(1.0, (iteration + 1) / config.face.n_iterations))

    return callback
