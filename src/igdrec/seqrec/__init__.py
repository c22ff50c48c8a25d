"""Traditional sequential recommenders (SASRec, GRU4Rec, most-popular) trained on the run's windows.

RecBole-style: models behind one protocol (`models`), a trainer (`trainer`) separate from the scoring
and evaluation (`evaluation`), windows as padded tensors (`data`). The `baseline` stage orchestrates them.
"""

from igdrec.seqrec.checkpoint import load_recommender, save_recommender
from igdrec.seqrec.data import SequenceBatch, SequenceData, pad_histories
from igdrec.seqrec.evaluation import RankingEvaluator, rank_items, title_groups, topk_frame
from igdrec.seqrec.models import GRU4Rec, ModelSettings, MostPopular, SequentialRecommender, SASRec, TrainableSequentialRecommender, build_model
from igdrec.seqrec.trainer import EpochRecord, Trainer, BaselineTrainResult

__all__ = [
    "GRU4Rec", "ModelSettings", "MostPopular", "SequentialRecommender", "SASRec", "TrainableSequentialRecommender", "build_model",
    "load_recommender", "save_recommender", "SequenceBatch", "SequenceData", "pad_histories",
    "RankingEvaluator", "rank_items", "title_groups", "topk_frame",
    "EpochRecord", "Trainer", "BaselineTrainResult",
]
