"""Running the processor in AWS: the Lambda handler for SQS batches."""
