//! The soak's verifier (`scripts/soak.sh` runs it once the relays have drained and stopped):
//! compares what the outbox committed with what the topic holds.
//!
//! ```sh
//! soak_check create-topic --topic T --partitions 8     # the soak's topic, before anything writes
//! soak_check verify --schema S --topic T [--quiet-secs 5] [--max-read-secs 900]
//! soak_check watermarks --schema S --topic T --group G    # why a consumer stalls
//! soak_check nudge --schema S --topic T [--force]          # move a stuck high watermark
//! ```
//! Environment: `DATABASE_URL`, `KAFKA_BROKERS`.
//!
//! `verify` reads the committed rows (a row only leaves `messages` into `delivered` or
//! `dead_letters`, so committed = delivered ∪ messages ∪ dead_letters), then every partition of
//! the topic from offset 0 until no record arrived for `--quiet-secs`. It does not stop at the high
//! watermark: the test broker can report one below its log end after producers restart. A
//! partition whose archive (the relay's (partition, offset) for each delivered row) names offsets
//! beyond what was read is read again from there. It prints the figures, one `key=value` line
//! (`soak_check: committed=... lost=...`), and the details of every lost row (its archive
//! partition and offset, and what the topic holds there: a lost row and a missed read look
//! different) and of every order violation. Exit status: 0 when lost = 0, order violations = 0,
//! distinct = committed, dead letters = 0 and nothing is pending; 1 otherwise; 2 on an error.
//!
//! `watermarks` prints, per partition, the broker's low and high watermarks, the end of the log
//! as the relay's archive knows it (last acknowledged offset + 1), and the group's committed
//! offset: a high watermark below the archive's end is the broker reporting less than it holds.
//!
//! `nudge` is for that case, which a consumer cannot get past (it reads up to the high watermark,
//! and the broker does not move it once the producers that wrote there are gone): in each such
//! partition it sends the last record below the high watermark again, an exact copy (key, value,
//! headers), so the broker appends a record and moves the watermark past the hidden ones. The copy
//! is a redelivery of a message the consumer applied already: its inbox must skip it. `--force`
//! does it in every partition that holds a record, to try the path on a broker without the fault.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use outbox_relay::db::DbConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

type Error = Box<dyn std::error::Error>;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn arg_u64(name: &str, default: u64) -> u64 {
    arg(name).map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a whole number"))).unwrap_or(default)
}

fn main() {
    let code = match std::env::args().nth(1).as_deref() {
        Some("create-topic") => create_topic().map(|()| 0),
        Some("verify") => verify(),
        Some("watermarks") => watermarks().map(|()| 0),
        Some("nudge") => nudge().map(|()| 0),
        _ => Err("usage: soak_check create-topic --topic T --partitions N | verify --schema S --topic T".into()),
    };
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            eprintln!("soak_check: error: {e}");
            std::process::exit(2);
        }
    }
}

fn brokers() -> Result<String, Error> {
    std::env::var("KAFKA_BROKERS").map_err(|_| "set KAFKA_BROKERS".into())
}

fn create_topic() -> Result<(), Error> {
    let topic = arg("--topic").ok_or("--topic is required")?;
    let partitions = arg_u64("--partitions", 8) as i32;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers()?).create()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    for r in rt.block_on(admin.create_topics([&new], &opts))? {
        r.map_err(|(t, e)| format!("create topic {t}: {e}"))?;
    }
    println!("soak_check: topic {topic} created with {partitions} partitions");
    Ok(())
}

/// A committed row as the outbox recorded it.
struct Row {
    id: Uuid,
    seq: i64,
    key: String,
    /// Where the relay's acknowledgement said it went (delivered rows).
    archived_at: Option<(i32, i64)>,
}

/// A record as read from the topic.
struct Record {
    id: Option<Uuid>,
    partition: i32,
    offset: i64,
}

struct Committed {
    rows: Vec<Row>,
    pending: usize,
    dead: Vec<(Uuid, String)>,
    archived_twice: usize,
    foreign_topic: usize,
}

async fn read_committed(schema: &str, topic: &str) -> Result<Committed, Error> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let db = DbConfig::parse(&url)?.with_statement_timeout(None).connect().await?;
    let q = |sql: &str| sql.replace("__S__", schema);
    let mut rows = Vec::new();
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut archived_twice = 0;
    let mut foreign_topic = 0;
    for r in db
        .query(
            &q("SELECT id, seq, coalesce(key, ''), kafka_topic, kafka_partition, kafka_offset FROM __S__.delivered"),
            &[],
        )
        .await?
    {
        let id: Uuid = r.get(0);
        if r.get::<_, String>(3) != topic {
            foreign_topic += 1;
        }
        if !seen.insert(id) {
            archived_twice += 1;
            continue;
        }
        rows.push(Row { id, seq: r.get(1), key: r.get(2), archived_at: Some((r.get(4), r.get(5))) });
    }
    let mut pending = 0;
    for r in db.query(&q("SELECT id, seq, coalesce(key, '') FROM __S__.messages"), &[]).await? {
        let id: Uuid = r.get(0);
        if seen.insert(id) {
            pending += 1;
            rows.push(Row { id, seq: r.get(1), key: r.get(2), archived_at: None });
        }
    }
    let mut dead = Vec::new();
    for r in db.query(&q("SELECT id, seq, coalesce(key, ''), reason FROM __S__.dead_letters"), &[]).await? {
        let id: Uuid = r.get(0);
        dead.push((id, r.get(3)));
        if seen.insert(id) {
            rows.push(Row { id, seq: r.get(1), key: r.get(2), archived_at: None });
        }
    }
    rows.sort_by_key(|r| r.seq);
    Ok(Committed { rows, pending, dead, archived_twice, foreign_topic })
}

fn reader(brokers: &str) -> Result<BaseConsumer, Error> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("soak-check-{}", Uuid::now_v7()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .set("enable.partition.eof", "false")
        .create()?)
}

/// Reads the given partitions from the given offsets until nothing arrived for `quiet`, or until
/// `deadline`.
fn read(
    consumer: &BaseConsumer,
    topic: &str,
    from: &[(i32, i64)],
    quiet: Duration,
    deadline: Instant,
    out: &mut Vec<Record>,
) -> Result<(), Error> {
    let mut tpl = TopicPartitionList::new();
    for &(p, o) in from {
        tpl.add_partition_offset(topic, p, Offset::Offset(o))?;
    }
    consumer.assign(&tpl)?;
    let mut last_record = Instant::now();
    let mut last_report = Instant::now();
    let start_len = out.len();
    while last_record.elapsed() < quiet && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_record = Instant::now();
                let id = m
                    .headers()
                    .and_then(|h| h.iter().find(|x| x.key == "ce_id").and_then(|x| x.value))
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| Uuid::parse_str(s).ok());
                out.push(Record { id, partition: m.partition(), offset: m.offset() });
            }
            Some(Err(e)) => {
                eprintln!("soak_check: consume: {e} (going on)");
                std::thread::sleep(Duration::from_millis(200));
            }
            None => {}
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("soak_check: read {} records so far", out.len());
            last_report = Instant::now();
        }
    }
    if Instant::now() >= deadline {
        eprintln!("soak_check: read deadline reached after {} records", out.len() - start_len);
    }
    Ok(())
}

/// Per partition of `topic`, the end of the log as the relay's archive knows it (last
/// acknowledged offset + 1).
fn archive_end(schema: &str, topic: &str) -> Result<HashMap<i32, i64>, Error> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let db = DbConfig::parse(&url)?.connect().await?;
        let rows = db
            .query(
                &format!(
                    "SELECT kafka_partition, max(kafka_offset) + 1 FROM {schema}.delivered WHERE kafka_topic = $1 GROUP BY 1"
                ),
                &[&topic],
            )
            .await?;
        Ok::<_, Error>(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    })
}

/// The partitions of `topic`.
fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, Error> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(20))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

fn watermarks() -> Result<(), Error> {
    let schema = arg("--schema").ok_or("--schema is required")?;
    let topic = arg("--topic").ok_or("--topic is required")?;
    let group = arg("--group").ok_or("--group is required")?;
    let archive_end = archive_end(&schema, &topic)?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers()?)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()?;
    let partitions = partitions_of(&consumer, &topic)?;
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition(&topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    let (mut below, mut lag) = (0, 0i64);
    let mut parts = Vec::new();
    for &p in &partitions {
        let (lo, hi) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
        let end = archive_end.get(&p).copied().unwrap_or(0);
        let c = match committed.find_partition(&topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        };
        if hi < end {
            below += 1;
        }
        lag += end - c.max(0);
        parts.push(format!(
            "{p}: low {lo} high {hi} archive-end {end} committed {c}{}",
            if hi < end { " HIGH<END" } else { "" }
        ));
    }
    let group_state = match consumer.client().fetch_group_list(Some(&group), Duration::from_secs(10)) {
        Ok(list) => list
            .groups()
            .iter()
            .map(|g| {
                let members: Vec<&str> = g.members().iter().map(|m| m.client_id()).collect();
                format!("group {} state {} with {} members {:?}", g.name(), g.state(), members.len(), members)
            })
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("group state unknown ({e})"),
    };
    println!(
        "soak_check: watermarks: {below} of {} partitions report a high watermark below the archive's end; group lag {lag}; {group_state}; {}",
        partitions.len(),
        parts.join("; ")
    );
    Ok(())
}

fn nudge() -> Result<(), Error> {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let schema = arg("--schema").ok_or("--schema is required")?;
    let topic = arg("--topic").ok_or("--topic is required")?;
    let force = std::env::args().any(|a| a == "--force");
    let archive_end = archive_end(&schema, &topic)?;
    let brokers = brokers()?;
    let consumer = reader(&brokers)?;
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "20000")
        .create()?;
    let mut nudged = 0;
    for p in partitions_of(&consumer, &topic)? {
        let (_, hi) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
        let end = archive_end.get(&p).copied().unwrap_or(0);
        if hi == 0 || !(hi < end || force) {
            continue;
        }
        // The last record a consumer can read there: one it has applied already.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, p, Offset::Offset(hi - 1))?;
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(15);
        let copy = loop {
            if Instant::now() >= deadline {
                break None;
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.partition() == p && m.offset() == hi - 1 => {
                    break Some((
                        m.key().map(<[u8]>::to_vec),
                        m.payload().map(<[u8]>::to_vec),
                        m.headers().map(|h| h.detach()),
                    ))
                }
                Some(Err(e)) => eprintln!("soak_check: nudge: reading {topic}/{p}@{}: {e} (going on)", hi - 1),
                _ => {}
            }
        };
        let Some((key, payload, headers)) = copy else {
            eprintln!("soak_check: nudge: could not read {topic}/{p}@{} within 15 s; partition left as it is", hi - 1);
            continue;
        };
        let mut record = BaseRecord::<[u8], [u8]>::to(&topic).partition(p);
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        if let Some(v) = payload.as_deref() {
            record = record.payload(v);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        producer.send(record).map_err(|(e, _)| format!("nudge: sending the copy to {topic}/{p}: {e}"))?;
        println!(
            "soak_check: nudge: {topic}/{p}: high watermark {hi}, archive end {end}; the record at offset {} sent again",
            hi - 1
        );
        nudged += 1;
    }
    producer.flush(Duration::from_secs(20))?;
    println!("soak_check: nudge: {nudged} partitions nudged");
    Ok(())
}

fn verify() -> Result<i32, Error> {
    let schema = arg("--schema").ok_or("--schema is required")?;
    let topic = arg("--topic").ok_or("--topic is required")?;
    let quiet = Duration::from_secs(arg_u64("--quiet-secs", 5));
    let deadline = Instant::now() + Duration::from_secs(arg_u64("--max-read-secs", 900));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let committed = rt.block_on(read_committed(&schema, &topic))?;
    eprintln!(
        "soak_check: {} committed rows ({} pending, {} dead letters); reading {topic} from offset 0",
        committed.rows.len(),
        committed.pending,
        committed.dead.len()
    );

    let brokers = brokers()?;
    let consumer = reader(&brokers)?;
    let partitions = partitions_of(&consumer, &topic)?;
    if partitions.is_empty() {
        return Err(format!("topic {topic} has no partitions (does it exist?)").into());
    }
    let mut records = Vec::new();
    let started = Instant::now();
    let all: Vec<(i32, i64)> = partitions.iter().map(|&p| (p, 0)).collect();
    read(&consumer, &topic, &all, quiet, deadline, &mut records)?;
    // Where the archive says records are that were not read: read those partitions again.
    let mut rereads = 0;
    for round in 0..3 {
        let mut read_max: HashMap<i32, i64> = HashMap::new();
        for r in &records {
            let e = read_max.entry(r.partition).or_insert(-1);
            *e = (*e).max(r.offset);
        }
        let mut behind: BTreeMap<i32, i64> = BTreeMap::new();
        for row in &committed.rows {
            if let Some((p, o)) = row.archived_at {
                if o > *read_max.get(&p).unwrap_or(&-1) {
                    let e = behind.entry(p).or_insert(0);
                    *e = (*e).max(o);
                }
            }
        }
        if behind.is_empty() || Instant::now() >= deadline {
            break;
        }
        rereads += 1;
        let from: Vec<(i32, i64)> = behind.keys().map(|p| (*p, read_max.get(p).copied().unwrap_or(-1) + 1)).collect();
        eprintln!(
            "soak_check: round {}: the archive names offsets beyond what was read in partitions {:?}; reading them again from {:?}",
            round + 1,
            behind,
            from
        );
        read(&consumer, &topic, &from, quiet * 2, deadline, &mut records)?;
    }
    let read_secs = started.elapsed().as_secs_f64();
    drop(consumer);

    // Dedup what was read twice by rereads (same partition and offset).
    let mut at: HashMap<(i32, i64), Option<Uuid>> = HashMap::new();
    records.retain(|r| at.insert((r.partition, r.offset), r.id).is_none());

    // First arrival of every id; then the figures as the tests compute them.
    let mut first: HashMap<Uuid, (i32, i64)> = HashMap::new();
    let mut without_id = 0;
    for r in &records {
        match r.id {
            Some(id) => {
                let e = first.entry(id).or_insert((r.partition, r.offset));
                if r.offset < e.1 {
                    *e = (r.partition, r.offset);
                }
            }
            None => without_id += 1,
        }
    }
    let committed_ids: HashSet<Uuid> = committed.rows.iter().map(|r| r.id).collect();
    let with_id = records.len() - without_id;
    let distinct = first.keys().filter(|id| committed_ids.contains(id)).count();
    let unknown = first.keys().filter(|id| !committed_ids.contains(id)).count();
    let duplicates = with_id - first.len();
    let lost: Vec<&Row> = committed.rows.iter().filter(|r| !first.contains_key(&r.id)).collect();
    let mut last_by_key: HashMap<&str, (&Row, (i32, i64))> = HashMap::new();
    let mut violations = Vec::new();
    for row in &committed.rows {
        if let Some(&pos) = first.get(&row.id) {
            if let Some((prev_row, prev)) = last_by_key.get(row.key.as_str()) {
                if prev.0 != pos.0 || prev.1 > pos.1 {
                    violations.push((*prev_row, *prev, row, pos));
                }
            }
            last_by_key.insert(row.key.as_str(), (row, pos));
        }
    }
    // Does the topic hold, at each archived (partition, offset), the row archived there?
    let mut archive_mismatch = 0;
    let mut archive_unread = 0;
    let mut archive_no_offset = 0;
    for row in &committed.rows {
        if let Some(pos) = row.archived_at {
            if pos.1 < 0 {
                archive_no_offset += 1;
                continue;
            }
            match at.get(&pos) {
                Some(Some(id)) if *id == row.id => {}
                Some(_) => archive_mismatch += 1,
                None => archive_unread += 1,
            }
        }
    }
    // Holes in the offsets read (0..=max of each partition).
    let mut per_partition: BTreeMap<i32, (usize, i64)> = BTreeMap::new();
    for r in &records {
        let e = per_partition.entry(r.partition).or_insert((0, -1));
        e.0 += 1;
        e.1 = e.1.max(r.offset);
    }
    let holes: i64 = per_partition.values().map(|(n, max)| max + 1 - *n as i64).sum();

    println!("soak_check: figures for topic {topic} (schema {schema}), read in {read_secs:.1}s ({rereads} rereads)");
    println!("  committed             {}", committed.rows.len());
    println!("  records at Kafka      {}", records.len());
    println!("  distinct at Kafka     {distinct}");
    println!("  duplicates at Kafka   {duplicates}");
    println!("  lost                  {}", lost.len());
    println!("  order violations      {} (keys affected: {})", violations.len(), {
        let keys: HashSet<&str> = violations.iter().map(|v| v.2.key.as_str()).collect();
        keys.len()
    });
    println!("  dead letters          {}", committed.dead.len());
    println!("  still pending         {}", committed.pending);
    println!("  unknown ids at Kafka  {unknown} (records without ce_id: {without_id})");
    println!(
        "  archive               {} rows archived twice, {} archived without an offset (negative), {} archived offsets holding another record, {} archived offsets not read, {} rows with another kafka_topic",
        committed.archived_twice, archive_no_offset, archive_mismatch, archive_unread, committed.foreign_topic
    );
    println!(
        "  partitions            {}",
        per_partition
            .iter()
            .map(|(p, (n, max))| format!("{p}: {n} records, offsets 0..={max}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if holes > 0 {
        println!("  offset holes          {holes} offsets between 0 and a partition's last offset were not read");
    }
    for (id, reason) in committed.dead.iter().take(20) {
        println!("  DEAD LETTER {id}: {reason}");
    }
    for row in lost.iter().take(50) {
        let where_ = match row.archived_at {
            Some((p, o)) => {
                let there = match at.get(&(p, o)) {
                    Some(Some(other)) => format!("the topic holds {other} there: the row is LOST (acknowledged at an offset that holds another record)"),
                    Some(None) => "the topic holds a record without ce_id there".to_owned(),
                    None => {
                        let max = per_partition.get(&p).map(|x| x.1).unwrap_or(-1);
                        format!("that offset was never read (partition {p} read up to {max}): a MISSED READ, or a hole in the log")
                    }
                };
                format!("archived at partition {p} offset {o}; {there}")
            }
            None => "not archived (still pending or dead-lettered)".to_owned(),
        };
        println!("  LOST {} seq {} key {}: {where_}", row.id, row.seq, row.key);
    }
    if lost.len() > 50 {
        println!("  ... and {} more lost", lost.len() - 50);
    }
    let mut all_positions: HashMap<Uuid, Vec<(i32, i64)>> = HashMap::new();
    for r in &records {
        if let Some(id) = r.id {
            all_positions.entry(id).or_default().push((r.partition, r.offset));
        }
    }
    let mut shown = 0;
    for row in &committed.rows {
        let Some(pos) = row.archived_at else { continue };
        let there = match at.get(&pos) {
            _ if pos.1 < 0 => "is no offset (the acknowledgement carried none)".to_owned(),
            Some(Some(id)) if *id == row.id => continue,
            Some(Some(id)) => format!("holds {id}"),
            Some(None) => "holds a record without ce_id".to_owned(),
            None => "was not read".to_owned(),
        };
        shown += 1;
        if shown > 20 {
            continue;
        }
        let mut found = all_positions.get(&row.id).cloned().unwrap_or_default();
        found.sort();
        println!(
            "  ARCHIVE {} seq {} key {}: archived at {}@{}, which {there}; the record is at {:?}",
            row.id, row.seq, row.key, pos.0, pos.1, found
        );
    }
    if shown > 20 {
        println!("  ... and {} more archive mismatches", shown - 20);
    }
    for (prev_row, prev, row, pos) in violations.iter().take(50) {
        println!(
            "  ORDER key {}: seq {} ({}) first at {}@{} but seq {} ({}) first at {}@{} (archived at {:?} and {:?})",
            row.key,
            prev_row.seq,
            prev_row.id,
            prev.0,
            prev.1,
            row.seq,
            row.id,
            pos.0,
            pos.1,
            prev_row.archived_at,
            row.archived_at
        );
    }
    let ok = lost.is_empty()
        && violations.is_empty()
        && distinct == committed.rows.len()
        && committed.dead.is_empty()
        && committed.pending == 0;
    println!(
        "soak_check: committed={} records={} distinct={} duplicates={} lost={} order_violations={} dead_letters={} pending={} unknown={} archive_no_offset={} archive_mismatch={} archive_unread={} result={}",
        committed.rows.len(),
        records.len(),
        distinct,
        duplicates,
        lost.len(),
        violations.len(),
        committed.dead.len(),
        committed.pending,
        unknown,
        archive_no_offset,
        archive_mismatch,
        archive_unread,
        if ok { "PASS" } else { "FAIL" }
    );
    Ok(if ok { 0 } else { 1 })
}
