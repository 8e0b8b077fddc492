"""Connection screening against DNS block/allow lists (``[screening]``), postscreen-style."""

from farm.screening.sites import Site, parse_site
from farm.screening.stage import ACTIONS, ScreeningStage, Verdict, screening_stage

__all__ = ["ACTIONS", "ScreeningStage", "Site", "Verdict", "parse_site", "screening_stage"]
