"""AWS runbooks (SQS, SNS, CloudWatch; LocalStack): one module per deployment, named for it."""
