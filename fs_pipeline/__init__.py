"""fs-pipeline: voice recordings -> a LoRA fine-tuned Fish Speech voice model, in restartable stages."""


class PipelineError(Exception):
    """An error the user can fix. Its message is one line: what went wrong, where, and what to do."""
