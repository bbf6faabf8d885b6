"""A small, predictable SparkSession for the feature job.

The job runs on a 2-core worker next to Airflow, so the session is tuned for that:
few shuffle partitions, no UI, UTC everywhere, scratch space in a private temp
directory and WARN-level logging. ``pyspark`` and ``airflow`` are imported inside
the functions so that importing this module stays cheap (DAG parsing imports it).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.fileio import atomic_write_text

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

# Standalone cluster default port, used when a connection names only a host.
_STANDALONE_PORT = 7077

# log4j2 settings handed to the driver JVM so that even start-up chatter is WARN+.
_LOG4J2_PROPERTIES = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.hadoop_native.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop_native.level = error
# SparkConf warns on every start that spark.local.dir may be overridden by a cluster
# manager; the job sets it on purpose.
logger.sparkconf.name = org.apache.spark.SparkConf
logger.sparkconf.level = error
"""


def _is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


@contextmanager
def spark_session(
    master: str = "local[2]",
    app_name: str = "dayloop",
    driver_memory: str = "1g",
    tmp_dir: Path | None = None,
) -> Iterator["SparkSession"]:
    """Yield a SparkSession tuned for a small box and stop it on exit.

    ``tmp_dir`` holds Spark's scratch space (shuffle/spill files under ``local/``, which
    Spark removes when it stops); when None a per-user directory in the system temp dir
    is used. If a session is already active in this process (a notebook, a test
    harness) a child session sharing its SparkContext is yielded instead and the
    owner's context is left running; ``master`` and ``driver_memory`` then have no effect.
    """
    if master.startswith("sc://"):
        raise ValueError(
            f"Spark Connect masters are not supported by the feature job: {master!r}; "
            "use local[N] or spark://host:port"
        )
    # The pandas-3 FutureWarning fires once on PySpark's first session; it is known
    # and harmless for this job (no pandas UDFs), so keep it out of task logs.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*does not yet fully support pandas.*", category=FutureWarning
        )
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
    if active is not None:
        log.info("reusing the active SparkContext (master=%s)", active.sparkContext.master)
        child = active.newSession()
        _apply_sql_conf(child)
        yield child
        return

    scratch = Path(tmp_dir) if tmp_dir is not None else _default_scratch()
    spark = _start(master, app_name, driver_memory, scratch)
    try:
        yield spark
    finally:
        stopped = time.perf_counter()
        spark.stop()
        log.info("Spark session stopped in %.1fs", time.perf_counter() - stopped)


def _default_scratch() -> Path:
    # A stable per-user directory rather than a fresh temp dir per session: Spark puts
    # unique blockmgr-*/spark-* dirs inside and deletes them itself, while its JVM
    # shutdown hook re-creates an empty local dir, which would pile up as temp dirs.
    return Path(tempfile.gettempdir()) / f"dayloop-spark-{os.getuid()}"


def _start(master: str, app_name: str, driver_memory: str, scratch: Path) -> "SparkSession":
    local_dir = scratch / "local"
    local_dir.mkdir(parents=True, exist_ok=True)
    log4j_file = scratch / "log4j2.properties"
    if not log4j_file.is_file() or log4j_file.read_text() != _LOG4J2_PROPERTIES:
        # Atomic, since concurrent sessions may share the scratch directory.
        atomic_write_text(log4j_file, _LOG4J2_PROPERTIES)
    if _is_local(master) and "SPARK_LOCAL_IP" not in os.environ:
        # Stay on loopback: a local driver needs no routable address, and Spark
        # otherwise warns about (and may pick) an external interface.
        os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*does not yet fully support pandas.*", category=FutureWarning
        )
        from pyspark.sql import SparkSession

        # C1-only JIT: the job's JVM lives for a minute on 2 cores, where C2 compile
        # threads compete with the tasks; measured ~40% less wall time, cold and warm.
        java_opts = (
            "-XX:TieredStopAtLevel=1 -Duser.timezone=UTC "
            f"-Dlog4j2.configurationFile=file:{log4j_file}"
        )
        builder = (
            SparkSession.builder.master(master)
            .appName(app_name)
            .config("spark.driver.memory", driver_memory)
            .config("spark.driver.extraJavaOptions", java_opts)
            .config("spark.executor.extraJavaOptions", "-Duser.timezone=UTC")
            .config("spark.local.dir", str(local_dir))
            .config("spark.sql.warehouse.dir", str(scratch / "warehouse"))
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        )
        if _is_local(master):
            builder = builder.config("spark.driver.host", "127.0.0.1").config(
                "spark.driver.bindAddress", "127.0.0.1"
            )
        started = time.perf_counter()
        spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    # py4j logs every connection open/close at INFO, even from __del__ at interpreter
    # exit, when log handlers may already be closed.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    _apply_sql_conf(spark)
    log.info(
        "Spark session started in %.1fs (master=%s, driver_memory=%s, version=%s)",
        time.perf_counter() - started,
        master,
        driver_memory,
        spark.version,
    )
    return spark


def _apply_sql_conf(spark: "SparkSession") -> None:
    """Session-level SQL settings; these may be changed on a live session."""
    conf = {
        # Tiny data on 2 cores: 200 default partitions would be 200 near-empty tasks.
        "spark.sql.shuffle.partitions": "4",
        "spark.sql.session.timeZone": "UTC",
        # Fail on overflow / bad casts instead of silently producing NULLs.
        "spark.sql.ansi.enabled": "true",
        # Pandas/pyarrow read TIMESTAMP_MICROS as timestamp[us, tz=UTC]; the INT96
        # default would come back tz-naive.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # Partition values (ds=YYYY-MM-DD) are parsed explicitly by the job.
        "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
    }
    for key, value in conf.items():
        spark.conf.set(key, value)


def master_from_connection(
    conn_type: str | None,
    host: str | None,
    port: int | None,
    extra: Mapping[str, Any] | None = None,
) -> str | None:
    """Turn the fields of an Airflow connection into a Spark master URL (None if empty).

    Accepts the Spark provider's conventions: ``extra.master`` wins; a host that is
    already a master (``local[4]``, ``yarn``, ``spark://h``, ``k8s://...``) is used as is,
    with ``port`` appended when the URL has none; a bare host name means a standalone
    cluster, ``spark://host:port`` (port 7077 by default).
    """
    explicit = (extra or {}).get("master")
    if explicit:
        return str(explicit).strip()
    host = (host or "").strip()
    if not host:
        return None
    if _is_local(host) or host == "yarn":
        return host
    if "://" in host:
        has_port = re.search(r":\d+/?$", host.split("://", 1)[1]) is not None
        return f"{host.rstrip('/')}:{port}" if port and not has_port else host
    scheme = (conn_type or "spark").strip().lower()
    if scheme not in {"spark", "k8s"}:
        scheme = "spark"
    return f"{scheme}://{host}:{port or _STANDALONE_PORT}"


def resolve_spark_master(conn_id: str, default: str) -> str:
    """The Spark master named by Airflow connection ``conn_id``, else ``default``.

    Call it inside a task (it reads the connection through the Airflow 3 Task SDK);
    outside Airflow, or when the connection does not exist, the default is returned.
    """
    try:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:
        log.info("Airflow is not importable; Spark master defaults to %s", default)
        return default
    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.info("connection %r not defined; Spark master defaults to %s", conn_id, default)
        return default
    except Exception as exc:  # noqa: BLE001 - no secrets backend / no API server outside a task
        log.warning(
            "could not read connection %r (%s: %s); Spark master defaults to %s",
            conn_id,
            type(exc).__name__,
            exc,
            default,
        )
        return default
    master = master_from_connection(conn.conn_type, conn.host, conn.port, conn.extra_dejson)
    if master is None:
        log.warning("connection %r has no host; Spark master defaults to %s", conn_id, default)
        return default
    log.info("Spark master from connection %r: %s", conn_id, master)
    return master
