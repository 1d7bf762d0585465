"""Sequential FEED: G generations of the same student; generation 1 learns from the teacher
ensemble by parallel FEED, generation g > 1 from generation g-1 alone. Each generation is a full
training run; the engine runs them in turn and reports every generation's accuracy.
See docs/methods.md."""

from kdray.distill.base import Generation, register
from kdray.distill.feed import FEED
from kdray.distill.hparams import HParam


@register
class SFEED(FEED):
    name = "sfeed"
    hparams = FEED.hparams + (HParam("generations", int, 2, "sequential FEED generations", low=1),)

    @classmethod
    def generations(cls, cfg):
        return [Generation(0, "ensemble")] + [Generation(g, "previous") for g in range(1, cfg.generations)]
