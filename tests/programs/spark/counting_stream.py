"""A Structured Streaming job for the Spark runbook's tests, run as a Python driver on the
standalone cluster (submitted through the master's REST API; never sets a master itself).

A rate source (unique, gapless ``value`` 0, 1, 2, ...) feeds a JSON file sink; the checkpoint
makes a restart continue with the next batch, and the file sink's log keeps each batch's rows
exactly once, so the sink can be checked for duplicates and gaps across a killed driver.

Arguments: ``<sink dir> <checkpoint dir> [rows per second] [trigger seconds]``.
"""

import sys

from pyspark.sql import SparkSession


def main(argv: list[str]) -> None:
    sink, checkpoint = argv[0], argv[1]
    rows_per_second = int(argv[2]) if len(argv) > 2 else 5
    trigger_s = float(argv[3]) if len(argv) > 3 else 1.0
    spark = SparkSession.builder.getOrCreate()  # name and master come from the submission
    spark.sparkContext.setLogLevel("WARN")
    query = (
        spark.readStream.format("rate")
        .option("rowsPerSecond", rows_per_second)
        .option("numPartitions", 1)
        .load()
        .selectExpr("value", "CAST(timestamp AS STRING) AS ts")
        .writeStream.format("json")
        .option("path", sink)
        .option("checkpointLocation", checkpoint)
        .trigger(processingTime=f"{trigger_s} seconds")
        .start()
    )
    query.awaitTermination()


if __name__ == "__main__":
    main(sys.argv[1:])
