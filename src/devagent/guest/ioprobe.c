/*
 * ioprobe: devagent's in-guest I/O prober.
 *
 * Usage: ioprobe SPEC DEVICE [DEVICE ...]
 *   DEVICE = PATH or NAME=PATH (NAME, without '/', names it in the output; the
 *     test guest uses the disk's serial, its node on the host)
 *   SPEC = pattern:read_pct:block_size:rate:span:prefill[:adopt]
 *     pattern     rand | seq | idle
 *     read_pct    0..100, share of ops that read (a read falls back to a write
 *                 when no block has been written yet)
 *     block_size  bytes per op, a power of two, 512..1048576
 *     rate        target ops/s, 0 = as fast as the device answers
 *     span        bytes of each device used from offset 0, 0 = the whole device
 *                 (a span larger than the device is clamped to it)
 *     prefill     bytes written sequentially (generation 1) on each device before
 *                 the workload
 *     adopt       (a guest booted again on a disk an earlier probe wrote, after a
 *                 crash) read the span first and take every valid block found as
 *                 written, at its generation: the digest then covers the disk as
 *                 found plus what this run writes; prefill skips adopted blocks
 *
 * Several devices share the workload: op k goes to device k mod N (so the rate is
 * the sum over them), prefill takes them in turn. Each has its own block table
 * and digest; the output's digest and block counts are over all of them (with
 * one device, exactly that device's), and the pause answer adds each device's
 * digest by name ("disks"), which the host compares with each disk's image.
 *
 * O_DIRECT, queue depth 1. Every written block starts with a 32-byte header,
 * little-endian: magic "DAGPROBE" (8), block index (u64), generation (u64),
 * crc32 of the payload (u32, zlib's crc32), block size (u32). The payload (the
 * rest of the block) is a splitmix64 stream seeded with H(index, generation),
 * where H(i, g) = splitmix64(i * 0x9E3779B97F4A7C15 ^ g). The probe keeps the
 * last generation of every block in RAM; reads check magic, index, generation
 * and crc. The digest is the XOR of H(i, gen[i]) over every written block, kept
 * up to date on each write; devagent.guest.probe.disk_digest computes the same
 * value from a disk image on the host.
 *
 * Two threads: the I/O worker issues ops and runs commands (pause, resume,
 * verify); the main thread prints a heartbeat every 100 ms (CLOCK_MONOTONIC)
 * and reads commands from stdin, so heartbeats go on while an op is stuck, the
 * workload is paused, the disk is prefilled or verified. Output lines:
 *   IOPROBE-START {...}     once, after the device is opened
 *   IOPROBE-ADOPTED {...}   once, with adopt: blocks taken, torn ones, the digest
 *   IOPROBE {...}           heartbeat
 *   IOPROBE-ERR {...}       an I/O error or a short read/write
 *   IOPROBE-VFAIL {...}     a read block that is not what was last written
 *   IOPROBE-PAUSED {...}    answer to "pause" (after fdatasync): the digest, and
 *                           the same worked out anew from the block table
 *   IOPROBE-VERIFIED {...}  answer to "verify"
 *   IOPROBE-FATAL {...}     the probe cannot run (bad spec, no device)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HEADER_SIZE 32
#define HEARTBEAT_NS 100000000LL
#define MAX_LAT_SAMPLES 8192
#define MAX_DETAIL_LINES_PER_HB 20
#define CMD_QUEUE 16
#define MAX_DISKS 16

static const char MAGIC[8] = {'D', 'A', 'G', 'P', 'R', 'O', 'B', 'E'};

enum pattern { PAT_RAND, PAT_SEQ, PAT_IDLE };
enum phase { PHASE_PREFILL, PHASE_RUN, PHASE_IDLE };
enum command { CMD_PAUSE, CMD_RESUME, CMD_VERIFY };
static const char *const PHASE_NAMES[] = {"prefill", "run", "idle"};

struct spec {
    enum pattern pattern;
    unsigned read_pct;
    uint64_t block_size;
    uint64_t rate;
    uint64_t span;
    uint64_t prefill;
    int adopt;
};

/* One device. Set once before the worker starts, but for: gen, seq_cursor,
 * prefill_next (the worker's own) and written_blocks, digest (guarded by g_mu). */
struct disk {
    const char *name;
    const char *path;
    int fd;
    uint64_t bytes;
    uint64_t nblocks;
    uint64_t prefill_blocks;
    uint32_t *gen;     /* last generation written, per block; 0 = never */
    uint32_t *written; /* indices of blocks written at least once */
    uint64_t written_blocks;
    uint64_t digest;
    uint64_t seq_cursor;
    uint64_t prefill_next;
};

/* Set once before the worker starts. */
static struct spec g_spec;
static struct disk g_disks[MAX_DISKS];
static unsigned g_ndisks;
static int64_t g_start_ns;

/* Owned by the worker thread only. */
static unsigned char *g_buf; /* aligned I/O buffer */
static uint64_t g_rng = 0x853c49e6748fea9bULL;
static unsigned g_next_disk; /* the device the next workload op goes to */

/* Shared, guarded by g_mu. */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv;
static enum phase g_phase = PHASE_IDLE;
static uint64_t g_iv_ops, g_iv_reads, g_iv_writes, g_iv_lat_max;
static uint32_t g_lat[MAX_LAT_SAMPLES];
static unsigned g_nlat;
static uint64_t g_ops_total, g_errors, g_vfails;
static unsigned g_detail_lines; /* ERR/VFAIL lines printed since the last heartbeat */
static int g_cmds[CMD_QUEUE];
static unsigned g_cmd_head, g_cmd_tail;

static pthread_mutex_t g_out_mu = PTHREAD_MUTEX_INITIALIZER;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void ns_to_timespec(int64_t ns, struct timespec *ts) {
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
}

static void emit(const char *fmt, ...) {
    va_list ap;
    pthread_mutex_lock(&g_out_mu);
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
    fflush(stdout);
    pthread_mutex_unlock(&g_out_mu);
}

/* Blocks written and the digest, over every device (call with g_mu held). */
static void totals(uint64_t *written, uint64_t *digest) {
    *written = *digest = 0;
    for (unsigned d = 0; d < g_ndisks; d++) {
        *written += g_disks[d].written_blocks;
        *digest ^= g_disks[d].digest;
    }
}

/* A detail line (ERR, VFAIL) unless too many were printed since the last heartbeat. */
static int detail_allowed(void) {
    pthread_mutex_lock(&g_mu);
    int ok = g_detail_lines < MAX_DETAIL_LINES_PER_HB;
    if (ok)
        g_detail_lines++;
    pthread_mutex_unlock(&g_mu);
    return ok;
}

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static uint64_t block_hash(uint64_t index, uint64_t gen) {
    return splitmix64(index * 0x9E3779B97F4A7C15ULL ^ gen);
}

static uint64_t rng_next(void) {
    g_rng += 0x9E3779B97F4A7C15ULL;
    return splitmix64(g_rng);
}

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static uint32_t crc32_buf(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFU;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFU;
}

static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint32_t get_le32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void fill_block(unsigned char *buf, uint64_t index, uint64_t gen) {
    uint64_t bs = g_spec.block_size;
    uint64_t state = block_hash(index, gen);
    for (uint64_t off = HEADER_SIZE; off < bs; off += 8) {
        state += 0x9E3779B97F4A7C15ULL;
        put_le64(buf + off, splitmix64(state));
    }
    memcpy(buf, MAGIC, 8);
    put_le64(buf + 8, index);
    put_le64(buf + 16, gen);
    put_le32(buf + 24, crc32_buf(buf + HEADER_SIZE, bs - HEADER_SIZE));
    put_le32(buf + 28, (uint32_t)bs);
}

static void record_op(int is_read, int64_t lat_ns) {
    uint64_t us = (uint64_t)(lat_ns / 1000);
    g_iv_ops++;
    g_ops_total++;
    if (is_read)
        g_iv_reads++;
    else
        g_iv_writes++;
    if (us > g_iv_lat_max)
        g_iv_lat_max = us;
    if (g_nlat < MAX_LAT_SAMPLES)
        g_lat[g_nlat++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static void report_io_error(const struct disk *dk, const char *op, uint64_t index, ssize_t ret,
                            int err) {
    pthread_mutex_lock(&g_mu);
    g_errors++;
    pthread_mutex_unlock(&g_mu);
    if (detail_allowed())
        emit("IOPROBE-ERR {\"disk\":\"%s\",\"op\":\"%s\",\"block\":%" PRIu64
             ",\"ret\":%zd,\"errno\":%d,\"message\":\"%s\"}",
             dk->name, op, index, ret, ret < 0 ? err : 0,
             ret < 0 ? strerror(err) : "short transfer");
}

/* Checks a block just read; returns 0 when it is what was last written there. */
static int check_block(const struct disk *dk, const unsigned char *buf, uint64_t index,
                       uint64_t expected_gen, int count_failure) {
    const char *reason = NULL;
    uint64_t found_index = get_le64(buf + 8);
    uint64_t found_gen = get_le64(buf + 16);
    uint32_t found_crc = get_le32(buf + 24);
    uint32_t crc = crc32_buf(buf + HEADER_SIZE, g_spec.block_size - HEADER_SIZE);
    if (memcmp(buf, MAGIC, 8) != 0)
        reason = "magic";
    else if (found_index != index)
        reason = "index";
    else if (found_gen != expected_gen)
        reason = "generation";
    else if (found_crc != crc)
        reason = "crc";
    if (reason == NULL)
        return 0;
    if (count_failure) {
        pthread_mutex_lock(&g_mu);
        g_vfails++;
        pthread_mutex_unlock(&g_mu);
    }
    if (detail_allowed())
        emit("IOPROBE-VFAIL {\"disk\":\"%s\",\"block\":%" PRIu64 ",\"expected_gen\":%" PRIu64
             ",\"found_gen\":%" PRIu64 ",\"found_index\":%" PRIu64 ",\"found_crc\":%" PRIu32
             ",\"crc\":%" PRIu32 ",\"reason\":\"%s\"}",
             dk->name, index, expected_gen, found_gen, found_index, found_crc, crc, reason);
    return -1;
}

static void write_block(struct disk *dk, uint64_t index) {
    uint64_t bs = g_spec.block_size;
    uint64_t old_gen = dk->gen[index];
    uint64_t gen = old_gen + 1;
    fill_block(g_buf, index, gen);
    int64_t t0 = now_ns();
    ssize_t ret = pwrite(dk->fd, g_buf, bs, (off_t)(index * bs));
    int err = errno;
    int64_t lat = now_ns() - t0;
    if (ret != (ssize_t)bs) {
        /* The old generation stays the expected one: the write is taken as not done. */
        report_io_error(dk, "write", index, ret, err);
        return;
    }
    dk->gen[index] = (uint32_t)gen;
    pthread_mutex_lock(&g_mu);
    if (old_gen == 0)
        dk->written[dk->written_blocks++] = (uint32_t)index;
    else
        dk->digest ^= block_hash(index, old_gen);
    dk->digest ^= block_hash(index, gen);
    record_op(0, lat);
    pthread_mutex_unlock(&g_mu);
}

static void read_block(struct disk *dk, uint64_t index) {
    uint64_t bs = g_spec.block_size;
    int64_t t0 = now_ns();
    ssize_t ret = pread(dk->fd, g_buf, bs, (off_t)(index * bs));
    int err = errno;
    int64_t lat = now_ns() - t0;
    if (ret != (ssize_t)bs) {
        report_io_error(dk, "read", index, ret, err);
        return;
    }
    pthread_mutex_lock(&g_mu);
    record_op(1, lat);
    pthread_mutex_unlock(&g_mu);
    check_block(dk, g_buf, index, dk->gen[index], 1);
}

static void workload_op(void) {
    struct disk *dk = &g_disks[g_next_disk];
    g_next_disk = (g_next_disk + 1) % g_ndisks;
    int want_read = (rng_next() % 100) < g_spec.read_pct;
    uint64_t written;
    pthread_mutex_lock(&g_mu);
    written = dk->written_blocks;
    pthread_mutex_unlock(&g_mu);
    if (g_spec.pattern == PAT_SEQ) {
        uint64_t index = dk->seq_cursor;
        dk->seq_cursor = (dk->seq_cursor + 1) % dk->nblocks;
        if (want_read && dk->gen[index] != 0)
            read_block(dk, index);
        else
            write_block(dk, index);
        return;
    }
    if (want_read && written > 0)
        read_block(dk, dk->written[rng_next() % written]);
    else
        write_block(dk, rng_next() % dk->nblocks);
}

static void do_verify(void) {
    uint64_t blocks = 0, failures = 0, digest = 0;
    for (unsigned d = 0; d < g_ndisks; d++) {
        struct disk *dk = &g_disks[d];
        uint64_t written;
        pthread_mutex_lock(&g_mu);
        written = dk->written_blocks;
        pthread_mutex_unlock(&g_mu);
        blocks += written;
        for (uint64_t k = 0; k < written; k++) {
            uint64_t index = dk->written[k];
            uint64_t bs = g_spec.block_size;
            ssize_t ret = pread(dk->fd, g_buf, bs, (off_t)(index * bs));
            if (ret != (ssize_t)bs) {
                report_io_error(dk, "verify-read", index, ret, errno);
                failures++;
                continue;
            }
            if (check_block(dk, g_buf, index, dk->gen[index], 1) != 0)
                failures++;
            else
                digest ^= block_hash(index, dk->gen[index]);
        }
    }
    emit("IOPROBE-VERIFIED {\"blocks\":%" PRIu64 ",\"failures\":%" PRIu64
         ",\"digest\":\"%016" PRIx64 "\"}",
         blocks, failures, digest);
}

/* A device's digest worked out anew from its block table (the worker's own: call it from
 * the worker). It equals the running digest unless the guest's memory lost an update. */
static uint64_t table_digest(const struct disk *dk) {
    uint64_t digest = 0;
    for (uint64_t k = 0; k < dk->written_blocks; k++)
        digest ^= block_hash(dk->written[k], dk->gen[dk->written[k]]);
    return digest;
}

static void do_pause_sync(void) {
    /* name, 16 hex digits and the JSON around them, for each device */
    char per_disk[MAX_DISKS * 320];
    size_t at = 0;
    uint64_t table = 0;
    for (unsigned d = 0; d < g_ndisks; d++) {
        struct disk *dk = &g_disks[d];
        if (fdatasync(dk->fd) != 0)
            report_io_error(dk, "fdatasync", 0, -1, errno);
        table ^= table_digest(dk);
        pthread_mutex_lock(&g_mu);
        uint64_t digest = dk->digest;
        pthread_mutex_unlock(&g_mu);
        at += (size_t)snprintf(per_disk + at, sizeof per_disk - at, "%s\"%.64s\":\"%016" PRIx64 "\"",
                               d ? "," : "", dk->name, digest);
    }
    pthread_mutex_lock(&g_mu);
    uint64_t digest, written, total = g_ops_total;
    totals(&written, &digest);
    pthread_mutex_unlock(&g_mu);
    emit("IOPROBE-PAUSED {\"digest\":\"%016" PRIx64 "\",\"written_blocks\":%" PRIu64
         ",\"ops_total\":%" PRIu64 ",\"table_digest\":\"%016" PRIx64 "\",\"disks\":{%s}}",
         digest, written, total, table, per_disk);
}

#define ADOPT_CHUNK (1 << 20)

static void fatal(const char *what, int err);

/* Takes the valid blocks of the span as written (see adopt in the header). A block
 * with the magic and its own index whose crc does not match is counted as torn (a
 * write the crash cut) and left unwritten: the host's digest skips it too. */
static void adopt_disk(struct disk *dk, unsigned char *chunk, uint64_t per, uint64_t *torn,
                       uint64_t *failed) {
    uint64_t bs = g_spec.block_size;
    for (uint64_t first = 0; first < dk->nblocks; first += per) {
        uint64_t count = dk->nblocks - first < per ? dk->nblocks - first : per;
        ssize_t ret = pread(dk->fd, chunk, count * bs, (off_t)(first * bs));
        if (ret != (ssize_t)(count * bs)) {
            report_io_error(dk, "adopt-read", first, ret, errno);
            (*failed)++;
            continue;
        }
        for (uint64_t k = 0; k < count; k++) {
            const unsigned char *b = chunk + k * bs;
            uint64_t index = first + k, gen = get_le64(b + 16);
            if (memcmp(b, MAGIC, 8) != 0 || get_le64(b + 8) != index || gen == 0 ||
                gen > UINT32_MAX)
                continue;
            if (get_le32(b + 24) != crc32_buf(b + HEADER_SIZE, bs - HEADER_SIZE)) {
                (*torn)++;
                continue;
            }
            dk->gen[index] = (uint32_t)gen;
            pthread_mutex_lock(&g_mu);
            dk->written[dk->written_blocks++] = (uint32_t)index;
            dk->digest ^= block_hash(index, gen);
            pthread_mutex_unlock(&g_mu);
        }
    }
}

static void adopt_disks(void) {
    uint64_t bs = g_spec.block_size, per = ADOPT_CHUNK / bs, torn = 0, failed = 0;
    unsigned char *chunk;
    if (per == 0)
        per = 1;
    if (posix_memalign((void **)&chunk, 4096, per * bs) != 0)
        fatal("allocate adopt buffer", ENOMEM);
    for (unsigned d = 0; d < g_ndisks; d++)
        adopt_disk(&g_disks[d], chunk, per, &torn, &failed);
    free(chunk);
    uint64_t written, digest;
    pthread_mutex_lock(&g_mu);
    totals(&written, &digest);
    pthread_mutex_unlock(&g_mu);
    emit("IOPROBE-ADOPTED {\"blocks\":%" PRIu64 ",\"torn\":%" PRIu64 ",\"failed_reads\":%" PRIu64
         ",\"digest\":\"%016" PRIx64 "\"}",
         written, torn, failed, digest);
}

/* The next device with a block left to prefill, in turn; NULL when all are prefilled. */
static struct disk *prefill_turn(void) {
    static unsigned turn;
    for (unsigned k = 0; k < g_ndisks; k++) {
        struct disk *dk = &g_disks[(turn + k) % g_ndisks];
        if (dk->prefill_next < dk->prefill_blocks) {
            turn = (turn + k + 1) % g_ndisks;
            return dk;
        }
    }
    return NULL;
}

static void *worker(void *arg) {
    (void)arg;
    int paused = 0;
    if (g_spec.adopt) {
        pthread_mutex_lock(&g_mu);
        g_phase = PHASE_PREFILL;
        pthread_mutex_unlock(&g_mu);
        adopt_disks();
    }
    int64_t interval = g_spec.rate > 0 ? (int64_t)(1000000000ULL / g_spec.rate) : 0;
    int64_t next_op = now_ns();
    for (;;) {
        pthread_mutex_lock(&g_mu);
        while (g_cmd_head != g_cmd_tail) {
            int cmd = g_cmds[g_cmd_head % CMD_QUEUE];
            g_cmd_head++;
            pthread_mutex_unlock(&g_mu);
            if (cmd == CMD_PAUSE) {
                paused = 1;
                pthread_mutex_lock(&g_mu);
                g_phase = PHASE_IDLE;
                pthread_mutex_unlock(&g_mu);
                do_pause_sync();
            } else if (cmd == CMD_RESUME) {
                paused = 0;
                next_op = now_ns();
            } else if (cmd == CMD_VERIFY) {
                pthread_mutex_lock(&g_mu);
                g_phase = PHASE_IDLE;
                pthread_mutex_unlock(&g_mu);
                do_verify();
            }
            pthread_mutex_lock(&g_mu);
        }
        struct disk *prefill = paused ? NULL : prefill_turn();
        int prefilling = prefill != NULL;
        if (paused || (!prefilling && g_spec.pattern == PAT_IDLE)) {
            g_phase = PHASE_IDLE;
            pthread_cond_wait(&g_cv, &g_mu);
            pthread_mutex_unlock(&g_mu);
            continue;
        }
        g_phase = prefilling ? PHASE_PREFILL : PHASE_RUN;
        if (!prefilling && interval > 0 && now_ns() < next_op) {
            struct timespec ts;
            ns_to_timespec(next_op, &ts);
            pthread_cond_timedwait(&g_cv, &g_mu, &ts);
            pthread_mutex_unlock(&g_mu);
            continue;
        }
        pthread_mutex_unlock(&g_mu);
        if (prefilling) {
            uint64_t index = prefill->prefill_next++;
            if (prefill->gen[index] == 0) /* not adopted */
                write_block(prefill, index);
            next_op = now_ns();
            continue;
        }
        workload_op();
        next_op += interval;
        int64_t now = now_ns();
        if (next_op < now - interval) /* fallen behind: no catch-up burst */
            next_op = now;
    }
    return NULL;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static void heartbeat(uint64_t hb) {
    static uint32_t lat[MAX_LAT_SAMPLES];
    unsigned nlat;
    uint64_t ops, reads, writes, lat_max, total, errors, vfails, written, digest;
    enum phase phase;
    pthread_mutex_lock(&g_mu);
    ops = g_iv_ops;
    reads = g_iv_reads;
    writes = g_iv_writes;
    lat_max = g_iv_lat_max;
    nlat = g_nlat;
    memcpy(lat, g_lat, nlat * sizeof lat[0]);
    total = g_ops_total;
    errors = g_errors;
    vfails = g_vfails;
    totals(&written, &digest);
    phase = g_phase;
    g_iv_ops = g_iv_reads = g_iv_writes = g_iv_lat_max = 0;
    g_nlat = 0;
    g_detail_lines = 0;
    pthread_mutex_unlock(&g_mu);
    uint64_t p99 = 0;
    if (nlat > 0) {
        qsort(lat, nlat, sizeof lat[0], cmp_u32);
        unsigned rank = (unsigned)((99ULL * nlat + 99) / 100); /* nearest rank, 1-based */
        p99 = lat[rank - 1];
    }
    if (ops > 0 && phase == PHASE_IDLE)
        phase = PHASE_RUN; /* ops completed in this interval before a pause */
    emit("IOPROBE {\"hb\":%" PRIu64 ",\"t_ms\":%" PRId64 ",\"phase\":\"%s\",\"ops\":%" PRIu64
         ",\"reads\":%" PRIu64 ",\"writes\":%" PRIu64 ",\"ops_total\":%" PRIu64
         ",\"errors\":%" PRIu64 ",\"verify_failures\":%" PRIu64 ",\"lat_max_us\":%" PRIu64
         ",\"lat_p99_us\":%" PRIu64 ",\"written_blocks\":%" PRIu64 ",\"digest\":\"%016" PRIx64
         "\"}",
         hb, (now_ns() - g_start_ns) / 1000000, PHASE_NAMES[phase], ops, reads, writes, total,
         errors, vfails, lat_max, p99, written, digest);
}

static void push_command(int cmd) {
    pthread_mutex_lock(&g_mu);
    if (g_cmd_tail - g_cmd_head < CMD_QUEUE) {
        g_cmds[g_cmd_tail % CMD_QUEUE] = cmd;
        g_cmd_tail++;
    }
    pthread_cond_signal(&g_cv);
    pthread_mutex_unlock(&g_mu);
}

static void handle_line(char *line) {
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
        line[--n] = '\0';
    while (*line == ' ' || *line == '\t')
        line++;
    if (*line == '\0')
        return;
    if (strcmp(line, "pause") == 0)
        push_command(CMD_PAUSE);
    else if (strcmp(line, "resume") == 0)
        push_command(CMD_RESUME);
    else if (strcmp(line, "verify") == 0)
        push_command(CMD_VERIFY);
    else {
        /* Print only safe characters back: the host parses this line as JSON. */
        char safe[64];
        size_t k = 0;
        for (size_t i = 0; line[i] != '\0' && k < sizeof safe - 1; i++)
            if (line[i] >= 'a' && line[i] <= 'z')
                safe[k++] = line[i];
        safe[k] = '\0';
        emit("IOPROBE-BADCMD {\"command\":\"%s\"}", safe);
    }
}

static int parse_u64(const char *s, uint64_t *out) {
    char *end;
    if (*s < '0' || *s > '9')
        return -1;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

static int parse_spec(const char *text, struct spec *sp) {
    char buf[256];
    char *fields[7];
    int n = 0;
    if (strlen(text) >= sizeof buf)
        return -1;
    strcpy(buf, text);
    for (char *tok = strtok(buf, ":"); tok != NULL; tok = strtok(NULL, ":")) {
        if (n == 7)
            return -1;
        fields[n++] = tok;
    }
    if (n != 6 && !(n == 7 && strcmp(fields[6], "adopt") == 0))
        return -1;
    sp->adopt = n == 7;
    if (strcmp(fields[0], "rand") == 0)
        sp->pattern = PAT_RAND;
    else if (strcmp(fields[0], "seq") == 0)
        sp->pattern = PAT_SEQ;
    else if (strcmp(fields[0], "idle") == 0)
        sp->pattern = PAT_IDLE;
    else
        return -1;
    uint64_t read_pct;
    if (parse_u64(fields[1], &read_pct) || read_pct > 100)
        return -1;
    sp->read_pct = (unsigned)read_pct;
    if (parse_u64(fields[2], &sp->block_size) || sp->block_size < 512 ||
        sp->block_size > 1048576 || (sp->block_size & (sp->block_size - 1)) != 0)
        return -1;
    if (parse_u64(fields[3], &sp->rate) || sp->rate > 1000000000ULL)
        return -1;
    if (parse_u64(fields[4], &sp->span) || parse_u64(fields[5], &sp->prefill))
        return -1;
    return 0;
}

static void fatal(const char *what, int err) {
    emit("IOPROBE-FATAL {\"message\":\"%s: %s\"}", what, err ? strerror(err) : "invalid");
    exit(1);
}

/* Opens argv's DEVICE (PATH or NAME=PATH) as g_disks[d], its block table made. */
static void open_disk(unsigned d, char *arg) {
    struct disk *dk = &g_disks[d];
    char *eq = strchr(arg, '=');
    dk->name = dk->path = arg;
    if (eq != NULL && memchr(arg, '/', (size_t)(eq - arg)) == NULL) {
        *eq = '\0';
        dk->path = eq + 1;
    }
    for (const char *c = dk->name; *c; c++)
        if (!(*c == '-' || *c == '_' || *c == '.' || *c == '/' || (*c >= '0' && *c <= '9') ||
              (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z')))
            fatal("a device name may hold only letters, digits and -_./", 0);
    dk->fd = open(dk->path, O_RDWR | O_DIRECT);
    if (dk->fd < 0)
        fatal("open device", errno);
    struct stat st;
    if (fstat(dk->fd, &st) != 0)
        fatal("stat device", errno);
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(dk->fd, BLKGETSIZE64, &dk->bytes) != 0)
            fatal("device size", errno);
    } else {
        dk->bytes = (uint64_t)st.st_size;
    }
    uint64_t span = g_spec.span == 0 || g_spec.span > dk->bytes ? dk->bytes : g_spec.span;
    dk->nblocks = span / g_spec.block_size;
    if (dk->nblocks == 0 || dk->nblocks > UINT32_MAX)
        fatal("span holds no block or too many blocks", 0);
    dk->prefill_blocks = g_spec.prefill / g_spec.block_size;
    if (dk->prefill_blocks > dk->nblocks)
        dk->prefill_blocks = dk->nblocks;
    dk->gen = calloc(dk->nblocks, sizeof *dk->gen);
    dk->written = calloc(dk->nblocks, sizeof *dk->written);
    if (dk->gen == NULL || dk->written == NULL)
        fatal("allocate block table", ENOMEM);
}

/* IOPROBE-START: the devices' names, bytes and blocks summed, and each device. */
static void emit_start(const char *spec) {
    char names[MAX_DISKS * 72], each[MAX_DISKS * 160];
    size_t at = 0, at_each = 0;
    uint64_t bytes = 0, blocks = 0;
    for (unsigned d = 0; d < g_ndisks; d++) {
        const struct disk *dk = &g_disks[d];
        bytes += dk->bytes;
        blocks += dk->nblocks;
        at += (size_t)snprintf(names + at, sizeof names - at, "%s%.64s", d ? "," : "", dk->name);
        at_each += (size_t)snprintf(
            each + at_each, sizeof each - at_each,
            "%s{\"name\":\"%.64s\",\"device_bytes\":%" PRIu64 ",\"blocks\":%" PRIu64 "}",
            d ? "," : "", dk->name, dk->bytes, dk->nblocks);
    }
    emit("IOPROBE-START {\"device\":\"%s\",\"device_bytes\":%" PRIu64 ",\"blocks\":%" PRIu64
         ",\"block_size\":%" PRIu64 ",\"spec\":\"%s\",\"disks\":[%s]}",
         names, bytes, blocks, g_spec.block_size, spec, each);
}

int main(int argc, char **argv) {
    if (argc < 3 || argc - 2 > MAX_DISKS) {
        fprintf(stderr, "usage: ioprobe pattern:read_pct:block_size:rate:span:prefill[:adopt] "
                        "DEVICE [DEVICE ...] (at most %d; DEVICE = PATH or NAME=PATH)\n",
                MAX_DISKS);
        emit("IOPROBE-FATAL {\"message\":\"usage: ioprobe SPEC DEVICE [DEVICE ...]\"}");
        return 2;
    }
    g_start_ns = now_ns();
    crc_init();
    g_rng ^= (uint64_t)g_start_ns;
    if (parse_spec(argv[1], &g_spec) != 0)
        fatal("bad spec", 0);
    g_ndisks = (unsigned)(argc - 2);
    for (unsigned d = 0; d < g_ndisks; d++)
        open_disk(d, argv[2 + d]);
    if (posix_memalign((void **)&g_buf, 4096, g_spec.block_size) != 0)
        fatal("allocate buffer", ENOMEM);

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g_cv, &ca);

    emit_start(argv[1]);

    pthread_t tid;
    if (pthread_create(&tid, NULL, worker, NULL) != 0)
        fatal("start worker", errno);

    char line[256];
    size_t len = 0;
    int stdin_open = 1;
    uint64_t hb = 0;
    int64_t next_hb = g_start_ns + HEARTBEAT_NS;
    for (;;) {
        int64_t now = now_ns();
        if (now >= next_hb) {
            heartbeat(++hb);
            next_hb += HEARTBEAT_NS;
            if (next_hb <= now) /* the guest stood still: no burst of late heartbeats */
                next_hb = now + HEARTBEAT_NS;
            continue;
        }
        struct timespec ts;
        ns_to_timespec(next_hb - now, &ts);
        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        int r = ppoll(&pfd, stdin_open ? 1 : 0, &ts, NULL);
        if (r <= 0 || !(pfd.revents & (POLLIN | POLLHUP | POLLERR)))
            continue;
        char chunk[128];
        ssize_t got = read(0, chunk, sizeof chunk);
        if (got <= 0) {
            if (got == 0 || (errno != EINTR && errno != EAGAIN))
                stdin_open = 0;
            continue;
        }
        for (ssize_t i = 0; i < got; i++) {
            char c = chunk[i];
            if (c == '\n' || c == '\r') {
                line[len] = '\0';
                handle_line(line);
                len = 0;
            } else if (len < sizeof line - 1) {
                line[len++] = c;
            }
        }
    }
}
