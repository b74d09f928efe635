"""Datasets in verl's math parquet schema: synthetic arithmetic, DAPO-Math-17K, benchmarks."""
