"""Traditional sequential recommenders (SASRec, GRU4Rec, most-popular) trained on the run's windows.

RecBole-style: models behind one protocol (`models`), a trainer (`trainer`) separate from the scoring
and evaluation (`evaluation`), windows as padded tensors (`data`). The `baseline` stage orchestrates them.
"""

from igdrec.seqrec.data import SequenceBatch, SequenceData
from igdrec.seqrec.evaluation import RankingEvaluator, probabilities_frame, rank_items, title_groups, topk_frame
from igdrec.seqrec.models import MODELS, GRU4Rec, ModelSettings, MostPopular, Recommender, SASRec, TrainableRecommender, build_model
from igdrec.seqrec.trainer import EpochRecord, Trainer, TrainResult, TrainSettings

__all__ = [
    "MODELS", "GRU4Rec", "ModelSettings", "MostPopular", "Recommender", "SASRec", "TrainableRecommender", "build_model",
    "SequenceBatch", "SequenceData", "RankingEvaluator", "probabilities_frame", "rank_items", "title_groups", "topk_frame",
    "EpochRecord", "Trainer", "TrainResult", "TrainSettings",
]
