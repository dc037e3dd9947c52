/*
 * coord_internal.h - the coordinator's types and the functions its files
 * share.  Private to server/; nothing here is a published API.
 *
 * Ownership in one paragraph: the coordinator owns a list of connections and
 * a map of jobs.  A job owns its rank table, a map of groups and the list of
 * its open rounds; a group owns its open rounds' list links and its
 * tombstone.  A connection points at its job and at its one open round; the
 * job's rank table points back at the connection while it is attached.
 * Connection memory is freed only in the close callbacks of its handles, a
 * round's memory only in its timer's close callback.
 *
 * Steady state allocates nothing (pool.c): a connection decodes every
 * message into its own arena, and a contribution filed in a round moves to
 * that round's slot by swapping arenas; ended rounds (with their timers and
 * slot arenas), encoded replies and queued-write records go back to the
 * coordinator's pools, each bounded below.
 */
#ifndef SBN_COORD_INTERNAL_H
#define SBN_COORD_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "arena.h"
#include "coordinator.h"
#include "frame.h"
#include "map.h"
#include "msg.h"
#include "observe.h"

/* Hello limits (the client's SBN_JOB_MAX / SBN_WORLD_MAX, the same numbers). */
#define SBN_SRV_JOB_MAX 128
#define SBN_SRV_WORLD_MAX 65536u
#define SBN_SRV_LAYER_MAX 256
/* Members gone that a refused contribution's error names (and lists in its
 * ranks); the others are counted. */
#define SBN_SRV_GONE_NAMED 8u
/*
 * Until a connection has been welcomed its frames may be at most this big: a
 * hello is a few hundred bytes, and a stranger should not make us buffer
 * megabytes.
 */
#define SBN_SRV_HELLO_MAX_FRAME 4096u
/* How long a closing connection may take to flush what it was sent. */
#define SBN_SRV_FLUSH_TIMEOUT_MS 2000u

/*
 * Pools (pool.c).  An arena keeps at most SBN_SRV_ARENA_KEEP_MAX bytes
 * between messages: enough for a default allreduce chunk (SBN_CHUNK_FLOATS
 * floats, 4 MiB) and its envelope; larger messages cost an allocation each.
 * Idle rounds, encoded buffers and write records are kept up to these
 * counts, and pooled rounds' arenas and pooled buffers up to these bytes;
 * past them memory goes back to the system.
 */
#define SBN_SRV_ARENA_KEEP_MAX (8u << 20)
#define SBN_SRV_POOL_ROUNDS_MAX 256u
#define SBN_SRV_POOL_ROUND_BYTES_MAX (256u << 20)
#define SBN_SRV_POOL_WBUFS_MAX 64u
#define SBN_SRV_POOL_WBUF_BYTES_MAX (64u << 20)
#define SBN_SRV_POOL_WRITES_MAX 1024u
/*
 * Pipelining: allreduce contributions a connection may send ahead of its open
 * one (the same group, the next seq).  Each is parked, decoded, in the
 * connection's park_arena until the open round ends, so a connection holds at
 * most this many extra messages (one chunk each).  Sent in the Welcome.
 */
#define SBN_SRV_PIPELINE_DEPTH 1u

/* A rank's state within the current generation of its job. */
enum sbn__srv_rank_state {
  SBN_RANK_NEVER = 0, /* not connected yet in this generation */
  SBN_RANK_CONNECTED,
  SBN_RANK_LOST, /* closed without goodbye */
  SBN_RANK_LEFT  /* said goodbye */
};

/*
 * An encoded frame shared by every connection it is written to; back to its
 * coordinator's pool when the last write completes.  Results are encoded
 * once per round.
 */
typedef struct sbn__srv_wbuf {
  unsigned refs;
  size_t len, cap;
  sbn__coord *coord;
  struct sbn__srv_wbuf *next; /* in the pool */
  uint8_t data[];
} sbn__srv_wbuf;

/* A queued write of (the tail of) a shared buffer. */
typedef struct sbn__srv_write {
  uv_write_t req;
  sbn__srv_wbuf *wb;
  size_t len;                  /* bytes of wb this write carries, counted in conn->queued */
  struct sbn__srv_write *next; /* in the pool */
} sbn__srv_write;

typedef struct sbn__srv_conn sbn__srv_conn;
typedef struct sbn__srv_job sbn__srv_job;
typedef struct sbn__srv_group sbn__srv_group;
typedef struct sbn__srv_round sbn__srv_round;

/*
 * Out of memory for a new connection, a listener's pending connection is
 * still taken (libuv reads a listener no further until its pending
 * connection is accepted) into this handle and closed at once: the client
 * sees its connection closed instead of a hang, and the listener goes on.
 * A connection that comes while the handle is closing waits for it, then
 * retry (the listener's connection callback) is called again for it.
 */
typedef struct sbn__srv_refuser {
  uv_tcp_t tcp;
  uv_stream_t *listener;
  uv_connection_cb retry;
  int busy, again;
} sbn__srv_refuser;
void sbn__srv_refuse(sbn__srv_refuser *r, uv_stream_t *listener, uv_connection_cb retry);

struct sbn__coord {
  uv_loop_t *loop;
  sbn__coord_config cfg;
  uv_tcp_t listener;
  int listening;        /* the listener handle was initialized */
  sbn__srv_refuser refuse; /* the listener's connections without memory */
  int stopping;         /* sbn__coord_stop() ran */
  sbn__srv_conn *conns; /* every connection not yet closed, a list */
  sbn__srv_map jobs;    /* job id -> sbn__srv_job */
  uint64_t next_conn_id;
  uint64_t next_session;
  int auth;         /* workers must prove they know cfg.secret */
  uint32_t nconns;  /* connections accepted and not yet freed (cfg.max_conns) */
  uint32_t njobs;   /* jobs alive (cfg.max_jobs) */
  /* Reused by allreduce for its double accumulator; grows, never shrinks. */
  double *scratch;
  size_t scratch_len;
  /* Observability (observe.h): counters, the HTTP server, its address. */
  sbn__metrics metrics;
  sbn__http *http;
  char metrics_addr[80];
  /* Pools (pool.c): singly linked free lists. */
  sbn__srv_round *pool_rounds;
  uint32_t pool_nrounds;
  size_t pool_round_bytes; /* the pooled rounds' arena buffers */
  sbn__srv_wbuf *pool_wbufs;
  uint32_t pool_nwbufs;
  size_t pool_wbuf_bytes;
  sbn__srv_write *pool_writes;
  uint32_t pool_nwrites;
  /*
   * Connections whose open round ended while they held a parked allreduce
   * contribution: dispatched from `ready_check` (never from inside the
   * round's completion), a list through conn->ready_prev/next.
   */
  sbn__srv_conn *ready;
  uv_check_t ready_check;
  uv_idle_t ready_idle; /* active with ready_check: the poll before it must not block */
  int ready_check_init; /* both were initialized (closed by sbn__coord_stop) */
};

struct sbn__srv_conn {
  uv_tcp_t tcp;
  /*
   * The hello timeout (through authentication) until welcomed, then the
   * stalled-frame timeout while part of a frame is held, and the flush
   * deadline when closing.
   */
  uv_timer_t timer;
  uv_shutdown_t shutdown_req;
  sbn__coord *coord;
  sbn__srv_conn *prev, *next; /* in coord->conns */
  uint64_t id;
  char peer[64];
  sbn__framer rx;
  sbn__arena arena;       /* every message is decoded here, reset after dispatch */
  sbn__arena hello_arena; /* holds hello_env while the challenge is out */
  int handles_open; /* close callbacks still to come; free at 0 */
  int closing;      /* no reads, no writes, teardown done */
  int broken;       /* a write failed; closes on the next loop iteration */
  char broken_why[192];
  int welcomed;
  int said_goodbye;
  uint64_t queued;  /* bytes handed to uv_write() and not yet written */
  uint32_t nwrites; /* uv_write() calls whose callback is still to come */
  /* The first queued write's record; more come from the pool. */
  sbn__srv_write wrec;
  int wrec_busy;
  /*
   * Authentication (with a secret): the hello waits here while the
   * challenge is out; the nonces are both sides' of this connection.
   */
  Sbn__Envelope *hello_env;
  uint8_t nonce_w[SBN_AUTH_NONCE_SIZE];
  uint8_t nonce_c[SBN_AUTH_NONCE_SIZE];
  int authed; /* the worker proved it holds the secret */
  /* Set once welcomed, cleared when the job lets go of the connection. */
  sbn__srv_job *job;
  uint32_t rank;
  uint64_t generation;
  sbn__srv_round *round; /* the open round holding this rank's contribution */
  /*
   * An allreduce contribution sent ahead of the open round (same group, seq
   * + 1), with its memory in park_arena; NULL when none.  At most
   * SBN_SRV_PIPELINE_DEPTH of them.  When the open round ends the connection
   * goes on coord->ready and the parked message is dispatched from there.
   */
  Sbn__Envelope *park_env;
  sbn__arena park_arena;
  /* The last round of this rank's that completed: an allreduce sent ahead of
   * it (Contribute.ahead) is accepted after it, and fails otherwise.  The
   * group is only compared, never followed. */
  const sbn__srv_group *ok_group;
  uint64_t ok_seq;
  int on_ready; /* in coord->ready */
  sbn__srv_conn *ready_prev, *ready_next;
};

/* One entry of a job's rank table. */
typedef struct sbn__srv_rank {
  sbn__srv_conn *conn;
  uint8_t state; /* enum sbn__srv_rank_state */
} sbn__srv_rank;

struct sbn__srv_job {
  sbn__srv_map_node node; /* in coord->jobs, keyed by name */
  sbn__coord *coord;
  char name[SBN_SRV_JOB_MAX];
  uint64_t generation;
  uint32_t world;
  uint32_t nconns;        /* attached connections; the job dies at 0 */
  uint32_t n_waiting;     /* connections with an open contribution */
  uint32_t ngroups;       /* groups created (cfg.max_groups) */
  uint32_t nrounds;       /* open rounds (cfg.max_rounds) */
  sbn__srv_rank *ranks;   /* [world] */
  sbn__srv_map groups;    /* members -> sbn__srv_group */
  sbn__srv_round *rounds; /* open rounds, a list */
  sbn__flight *flight;    /* its last rounds, allocated at the first one ended */
};

/*
 * A group: WORLD or a sorted subset of the job's ranks.  Groups live as long
 * as their job; a job may create at most cfg.max_groups of them.
 */
struct sbn__srv_group {
  sbn__srv_map_node node; /* in job->groups; the key is `members` bytes */
  sbn__srv_job *job;
  uint32_t n;   /* member count */
  int is_world; /* members[] is empty: member i is rank i */
  /*
   * Open rounds of this group.  Each holds at least one contribution and a
   * connection holds at most one, so this list is never longer than the
   * group; in lock-step training it holds one round.
   */
  sbn__srv_round *rounds;
  /* Tombstone of the last failed round: later seqs up to it fail at once. */
  int tomb_set;
  uint64_t tomb_seq;
  int tomb_code;
  char *tomb_msg;
  uint32_t *tomb_ranks;
  size_t tomb_nranks;
  uint32_t members[]; /* [n] unless is_world */
};

struct sbn__srv_round {
  uv_timer_t timer; /* the round timeout; stays initialized while pooled */
  sbn__srv_group *group;
  sbn__srv_round *job_prev, *job_next; /* in job->rounds */
  sbn__srv_round *grp_next;            /* in group->rounds */
  uint64_t seq;
  uint32_t n;               /* group size */
  uint32_t nhave;           /* contributions so far */
  uint32_t ref;             /* group index of the first contributor, the reference */
  int dead;                 /* failed or completed; only the close callback remains */
  uint64_t t0;              /* uv_hrtime() of the first contribution */
  uint32_t cap;             /* slots allocated (>= n when reused from the pool) */
  sbn__srv_round *pool_next;
  uint32_t *arrived;        /* [n] group indices in arrival order */
  uint32_t *t_us;           /* [n] by group index: arrival, microseconds after t0 */
  sbn__arena *arenas;       /* [cap] by group index: the memory under contrib[] */
  Sbn__Envelope *contrib[]; /* [n] by group index, NULL until it arrives */
};

/* coordinator.c */
double *sbn__srv_scratch(sbn__coord *c, size_t n);
/* Puts conn (whose open round just ended, holding a parked message) on the
 * ready list; a no-op when it is already there or the coordinator stops. */
void sbn__srv_ready_add(sbn__srv_conn *conn);
/* Takes conn off the ready list if it is there. */
void sbn__srv_ready_remove(sbn__srv_conn *conn);

/* pool.c */
/* A round with room for n members, timer initialized and stopped; NULL
 * without memory. */
sbn__srv_round *sbn__srv_pool_round_get(sbn__coord *c, uint32_t n);
/* Takes back an ended round: its slot arenas are reset, its timer stopped. */
void sbn__srv_pool_round_put(sbn__coord *c, sbn__srv_round *r);
/* A buffer of at least len data bytes with one reference, or NULL. */
sbn__srv_wbuf *sbn__srv_pool_wbuf_get(sbn__coord *c, size_t len);
sbn__srv_write *sbn__srv_pool_write_get(sbn__coord *c);
void sbn__srv_pool_write_put(sbn__coord *c, sbn__srv_write *w);
/* Shutdown: closes the pooled rounds' timers so the loop can end. */
void sbn__srv_pool_drain(sbn__coord *c);
/* Frees what is left (after the loop has run the close callbacks). */
void sbn__srv_pool_free(sbn__coord *c);

/* conn.c */
/* Accepts the listener's pending connection: SBN_OK, or SBN_ENOMEM (it is
 * still pending then: see sbn__srv_refuse). */
int sbn__srv_conn_accept(sbn__coord *c);
/* Closes conn; with flush, what was queued is written first (bounded). */
void sbn__srv_conn_close(sbn__srv_conn *conn, int flush, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/*
 * Queues a frame; takes its own reference.  No-op on a closing connection.
 * Never closes the connection synchronously, so it is safe in loops over
 * a round's members.  wb NULL is a message that could not be built (out of
 * memory): the connection is then closed (from the loop, soon after), so
 * the worker fails at once instead of waiting for what it will not get.
 */
void sbn__srv_conn_send(sbn__srv_conn *conn, sbn__srv_wbuf *wb);
/* Sends an Error about one request to conn alone. */
void sbn__srv_conn_error(sbn__srv_conn *conn, int code, const uint32_t *ranks, size_t nranks,
                         uint64_t seq, int phase, const char *layer, const char *fmt, ...)
    __attribute__((format(printf, 8, 9)));
/*
 * Dispatches conn's parked contribution as if it had just arrived (its open
 * round has ended), or drops it when conn is closing or has left its job.
 * Takes conn off the ready list.  No-op without a parked message.
 */
void sbn__srv_conn_unpark(sbn__srv_conn *conn);

/* Encodes env as a frame into a wbuf with one reference; NULL on failure
 * with the status in *rc (SBN_ENOMEM or SBN_ETOOBIG). */
sbn__srv_wbuf *sbn__srv_wbuf_encode(sbn__coord *c, const Sbn__Envelope *env, uint32_t max_frame,
                                    int *rc);
/* Drops a reference; the last one returns the buffer to its pool. */
void sbn__srv_wbuf_unref(sbn__srv_wbuf *wb);
sbn__srv_wbuf *sbn__srv_error_encode(sbn__coord *c, int code, const char *msg,
                                     const uint32_t *ranks, size_t nranks, uint64_t seq, int phase,
                                     const char *layer);

/* handshake.c */
/*
 * Message handlers borrow env, which lives in conn->arena until the
 * dispatch returns; one that keeps it takes the arena by swapping.
 */
/* A hello arrived on a connection not yet welcomed. */
void sbn__srv_hello(sbn__srv_conn *conn, Sbn__Envelope *env);
/* A Proof arrived. */
void sbn__srv_proof(sbn__srv_conn *conn, Sbn__Envelope *env);

/* job.c */
void sbn__srv_job_hello(sbn__srv_conn *conn, const Sbn__Hello *h);
/* Sends a Reject with code and message, logs it, closes conn (flushed). */
void sbn__srv_reject(sbn__srv_conn *conn, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The connection is going away: its rank becomes lost (or left). */
void sbn__srv_job_conn_gone(sbn__srv_conn *conn);
/*
 * Finds or creates the group of members (empty = WORLD); NULL with *rc set
 * to SBN_ENOMEM, or SBN_ELIMIT when the job has cfg.max_groups groups.
 */
sbn__srv_group *sbn__srv_group_get(sbn__srv_job *job, const uint32_t *members, size_t n,
                                   int *rc);
/* The group index of world rank r, or -1 if r is not a member. */
long sbn__srv_group_index(const sbn__srv_group *g, uint32_t r);
uint32_t sbn__srv_group_rank(const sbn__srv_group *g, uint32_t i);
void sbn__srv_group_describe(const sbn__srv_group *g, char *buf, size_t len);
void sbn__srv_job_free_all(sbn__coord *c);
/* Shutdown: fails every open round of every job with SBN_ESHUTDOWN. */
void sbn__srv_jobs_shutdown(sbn__coord *c);

/* round.c */
/* Files env (taking conn->arena) or answers it with an error. */
void sbn__srv_contribute(sbn__srv_conn *conn, Sbn__Envelope *env);
/* Fails round r for every member that contributed, leaves a tombstone. */
void sbn__srv_round_fail(sbn__srv_round *r, int code, const uint32_t *ranks, size_t nranks,
                         const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Frees a round without telling anyone (the job is being reset). */
void sbn__srv_round_drop(sbn__srv_round *r);
void sbn__srv_group_tomb_release(sbn__srv_group *g);

#endif /* SBN_COORD_INTERNAL_H */
