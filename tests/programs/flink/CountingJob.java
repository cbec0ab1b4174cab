// The tests' Flink job: a throttled source of keys, a counter per key in keyed state, written out.
//
// Arguments (programArgsList):
//   --name NAME           job name (tests run several jobs with distinct names)
//   --rate N              records per second of the whole source (default 20)
//   --keys K              number of distinct keys (default 4)
//   --out DIR             the counter operator appends "key count" lines to DIR/part-<subtask>.txt,
//                         flushed per line: the newest line of a key is its latest count
//   --fail-file PATH      while that file exists the counter operator throws: the job FAILS
//   --sink-delay-ms M     sleep per record in the counter operator (backpressures the source)
//
// The throttle is the source's own rate limiter (DataGeneratorSource + RateLimiterStrategy): it sits
// before the keyBy, in the source task, so a slow counter backpressures it without holding up the
// checkpoint barriers forever. Every operator has a stable uid, so its state maps back onto it when
// the job is submitted again from a checkpoint, at the same or another parallelism.
package runbooks.tests;

import java.io.File;
import java.io.FileWriter;
import java.io.IOException;
import java.io.Writer;
import java.nio.charset.StandardCharsets;
import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.connector.source.util.ratelimit.RateLimiterStrategy;
import org.apache.flink.connector.datagen.source.DataGeneratorSource;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink;
import org.apache.flink.util.Collector;
import org.apache.flink.util.ParameterTool;

public class CountingJob {

    public static void main(String[] args) throws Exception {
        ParameterTool params = ParameterTool.fromArgs(args);
        String name = params.get("name", "counting-job");
        double rate = params.getDouble("rate", 20);
        long keys = params.getLong("keys", 4);
        String out = params.get("out", null);
        String failFile = params.get("fail-file", null);
        long sinkDelayMs = params.getLong("sink-delay-ms", 0);

        StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment();
        DataGeneratorSource<Long> source =
                new DataGeneratorSource<>(
                        index -> index % keys,
                        Long.MAX_VALUE,
                        RateLimiterStrategy.perSecond(rate),
                        Types.LONG);
        env.fromSource(source, WatermarkStrategy.noWatermarks(), "keys")
                .uid("counting-source")
                .keyBy(key -> key, Types.LONG)
                .process(new Counter(out, failFile, sinkDelayMs))
                .uid("counter")
                .name("counter")
                .sinkTo(new DiscardingSink<>())
                .uid("discard")
                .name("discard");
        env.execute(name);
    }

    /** Counts records per key in a ValueState and writes each new count to its part file. */
    public static class Counter extends KeyedProcessFunction<Long, Long, String> {
        private final String out;
        private final String failFile;
        private final long sinkDelayMs;
        private transient ValueState<Long> count;
        private transient Writer writer;

        public Counter(String out, String failFile, long sinkDelayMs) {
            this.out = out;
            this.failFile = failFile;
            this.sinkDelayMs = sinkDelayMs;
        }

        @Override
        public void open(OpenContext context) throws IOException {
            count = getRuntimeContext().getState(new ValueStateDescriptor<>("count", Types.LONG));
            if (out != null) {
                File dir = new File(out);
                dir.mkdirs();
                int subtask = getRuntimeContext().getTaskInfo().getIndexOfThisSubtask();
                writer =
                        new FileWriter(
                                new File(dir, "part-" + subtask + ".txt"),
                                StandardCharsets.UTF_8,
                                true);
            }
        }

        @Override
        public void processElement(Long key, Context ctx, Collector<String> collector)
                throws Exception {
            if (failFile != null && new File(failFile).exists()) {
                throw new IllegalStateException("fail file " + failFile + " exists: failing on purpose");
            }
            if (sinkDelayMs > 0) {
                Thread.sleep(sinkDelayMs);
            }
            Long current = count.value();
            long next = (current == null ? 0 : current) + 1;
            count.update(next);
            String line = key + " " + next;
            if (writer != null) {
                writer.write(line + "\n");
                writer.flush();
            }
            collector.collect(line);
        }

        @Override
        public void close() throws Exception {
            if (writer != null) {
                writer.close();
            }
        }
    }
}
