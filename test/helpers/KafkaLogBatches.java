// Reads topics' record batches straight from the broker's log segments with Kafka's own record
// classes (kafka-clients), so tests see the codec the broker stored and the records it holds
// without going through kafkajs. Run by test/helpers/kafka.ts with the broker's jars:
//   java -cp '.services/kafka/lib/*' KafkaLogBatches.java BOOTSTRAP TOPIC...
// Prints one line per record: topic, partition, batch base offset, codec, base64 of the value.
// The log directory comes from the broker (DescribeLogDirs): the broker must run on this machine.
import java.io.File;
import java.nio.ByteBuffer;
import java.util.*;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.record.*;

public class KafkaLogBatches {
  public static void main(String[] args) throws Exception {
    Properties props = new Properties();
    props.put("bootstrap.servers", args[0]);
    Set<String> topics = new HashSet<>(Arrays.asList(args).subList(1, args.length));
    try (Admin admin = Admin.create(props)) {
      int broker = admin.describeCluster().nodes().get().iterator().next().id();
      Map<String, LogDirDescription> dirs = admin.describeLogDirs(List.of(broker)).allDescriptions().get().get(broker);
      for (Map.Entry<String, LogDirDescription> dir : dirs.entrySet()) {
        for (TopicPartition tp : dir.getValue().replicaInfos().keySet()) {
          if (topics.contains(tp.topic())) printPartition(new File(dir.getKey(), tp.topic() + "-" + tp.partition()), tp);
        }
      }
    }
  }

  private static void printPartition(File dir, TopicPartition tp) throws Exception {
    File[] segments = dir.listFiles((d, name) -> name.endsWith(".log"));
    Arrays.sort(segments);
    for (File segment : segments) {
      try (FileRecords records = FileRecords.open(segment, false)) {
        for (RecordBatch batch : records.batches()) {
          for (org.apache.kafka.common.record.Record record : batch) {
            ByteBuffer value = record.value();
            byte[] bytes = new byte[value == null ? 0 : value.remaining()];
            if (value != null) value.get(bytes);
            System.out.println(String.join("\t", tp.topic(), String.valueOf(tp.partition()), String.valueOf(batch.baseOffset()),
                batch.compressionType().name, Base64.getEncoder().encodeToString(bytes)));
          }
        }
      }
    }
  }
}
