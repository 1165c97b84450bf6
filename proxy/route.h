/*
 * route.h - transparent listeners: where an intercepted connection was
 * headed, and which route of its listener takes it.
 *
 * iptables REDIRECT (scripts/portcullis-init) rewrites the destination of
 * an app's connection to the sidecar's port; conntrack remembers the
 * original, which SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6)
 * read back from the accepted socket. An outbound transparent listener
 * matches it against its routes in order (config.h): the first route whose
 * CIDR and port hold it, or whose name's current endpoint set has it, takes
 * the connection, and the endpoint is pinned to the original destination
 * (endpoint.h: pc_target_endpoint_for). An inbound transparent listener
 * sends every connection to 127.0.0.1 on the original port.
 * Loop thread of the accepting worker.
 */
#ifndef PC_ROUTE_H
#define PC_ROUTE_H

#include <sys/socket.h>

#include <uv.h>

#include "config.h"
#include "endpoint.h"

/* The original destination of accepted connection tcp, as an AF_INET (also
 * for an IPv4 peer on a dual-stack socket) or AF_INET6 address. Returns 0;
 * 1 when it is tcp's own local address (the app connected to the listener
 * itself, nothing was intercepted); -1 when the kernel knows none (the
 * connection was not redirected and conntrack does not track it). */
int pc_route_original_dst(uv_tcp_t *tcp, struct sockaddr_storage *dst);

/* The route of outbound transparent listener l that takes dst, and in *ep
 * its endpoint at dst (counted in flight, as pc_target_endpoint_for). NULL
 * (and *ep NULL) if no route does. */
const pc_listener_cfg_t *pc_route_match(const pc_listener_cfg_t *l,
                                        const struct sockaddr_storage *dst, pc_endpoint_t **ep);

/* Inbound transparent listener l: the endpoint 127.0.0.1:<dst's port>
 * (counted in flight). */
pc_endpoint_t *pc_route_local(const pc_listener_cfg_t *l, const struct sockaddr_storage *dst);

#endif
