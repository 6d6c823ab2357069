"""fluxc graph passes: find attention sites in Dynamo FX graphs and rewrite them into routed attention."""

from fluxc.passes.rewrite import PassOptions, PassResult, RouteState, SiteInfo, analyse, counters, flux_pass
from fluxc.passes.sites import SiteMatch, find_sites

__all__ = ["PassOptions", "PassResult", "RouteState", "SiteInfo", "SiteMatch", "analyse", "counters",
           "find_sites", "flux_pass"]
