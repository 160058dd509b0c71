"""``finetune data audit``: near-duplicates and leakage, label issues, outliers and blank images. The
algorithms on features (`findings`), the run over a dataset (`auditor`), and its files (`report`)."""
from finetune.audit.auditor import (DEFAULT_BACKBONE, DEFAULT_PRETRAINED, Audit, audit_dataset, audit_features,
                                    embed_manifest)
from finetune.audit.findings import (
    DUPLICATE_COSINE,
    FOLDS,
    NEIGHBOURS,
    OUTLIER_MADS,
    THUMBNAIL_COSINE,
    confident_learning,
    find_near_duplicates,
    multilabel_label_issues,
    nearest_neighbours,
    normalize,
    out_of_fold_log_probabilities,
    outlier_distances,
)
from finetune.audit.report import FILES, check_audit_folder, render_audit, summary_text, to_json, write_audit

__all__ = [
    "DEFAULT_BACKBONE", "DEFAULT_PRETRAINED", "Audit", "audit_dataset", "audit_features", "embed_manifest",
    "DUPLICATE_COSINE", "FOLDS", "NEIGHBOURS", "OUTLIER_MADS", "THUMBNAIL_COSINE", "confident_learning",
    "find_near_duplicates", "multilabel_label_issues", "nearest_neighbours", "normalize", "out_of_fold_log_probabilities", "outlier_distances",
    "FILES", "check_audit_folder", "render_audit", "summary_text", "to_json", "write_audit",
]
