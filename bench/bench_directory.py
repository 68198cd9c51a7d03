"""The simulated directory every benchmark uses: `count` plain users bench0, bench1, … .

Each is a `User` without mail attributes, so every CREATE_EMAIL for one is a real "created".
"""

from __future__ import annotations


def plain_users(count: int) -> dict[str, object]:
    return {
        "domain": "CONTOSO",
        "upn_suffix": "contoso.com",
        "smtp_domain": "contoso.com",
        "users": [
            {
                "sam_account_name": f"bench{i}",
                "user_principal_name": f"bench{i}@contoso.com",
                "name": f"Bench User {i}",
                "display_name": f"Bench User {i}",
                "distinguished_name": f"CN=Bench User {i},OU=Bench,DC=contoso,DC=com",
                "guid": f"00000000-0000-0000-0000-{i:012d}",
                "recipient_type_details": "User",
            }
            for i in range(count)
        ],
    }
